"""gpu_check's command line: which rows, where they run, the table at the end (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gpu_check
from gpu_check import report
from gpu_check.rows import DRY_RUN, GPU, ROWS, Profile, RowSpec, skip_reason
from gpu_check.supervise import Supervisor
from gpu_check.tiny_job import TinyJobCheck

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=gpu_check.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the same code on the CPU with the tiny model (what CI runs)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "gpu-check"),
        help="where gpu_check.md and gpu_check.json go (default: $OUT, else ./gpu-check)",
    )
    parser.add_argument("--only", help=f"rows to measure, comma-separated ({', '.join(r.key for r in ROWS)})")
    parser.add_argument(
        "--no-tiny-job", action="store_true", help="leave out the tiny job's kill-and-resume run"
    )
    parser.add_argument(
        "--offload-dir", help="where disk offload writes (default: the system temp folder; never under --out)"
    )
    return parser.parse_args(argv)


def supported_precisions() -> tuple[str, ...]:
    """The base_model_precision values lokr-job's config accepts: a row counts once its precision is here."""
    from job.config.schema import JobConfig

    return typing.get_args(JobConfig.model_fields["base_model_precision"].annotation)


def cuda_available() -> bool:
    # Asked of a child process, so that this one never initialises CUDA: the rows' workers own the GPU.
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def filesystem(path: str) -> str:
    """The filesystem type holding ``path`` (tmpfs would make "disk" offload a RAM measurement)."""
    best, kind = Path("/nonexistent"), "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = Path(parts[1])
        if Path(path).is_relative_to(mount) and (kind == "unknown" or len(mount.parts) > len(best.parts)):
            best, kind = mount, parts[2]
    return kind


def worker_env(profile: Profile) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), str(REPO), env.get("PYTHONPATH")]))
    if profile.threads:
        env["OMP_NUM_THREADS"] = str(profile.threads)
    return env


def selected_rows(only: str | None) -> list[RowSpec]:
    keys = [r.key for r in ROWS]
    chosen = [key.strip() for key in (only or ",".join(keys)).split(",") if key.strip()]
    unknown = [key for key in chosen if key not in keys]
    if unknown:
        raise SystemExit(f"gpu_check: --only: unknown rows {', '.join(unknown)} (rows: {', '.join(keys)})")
    return [r for r in ROWS if r.key in chosen]


def measure_rows(
    rows: list[RowSpec],
    profile: Profile,
    task: dict[str, Any],
    env: dict[str, str],
    budget: Callable[[str], float],
) -> Supervisor:
    """Each row in a worker process: one per row on the GPU, one for all of them on the CPU."""

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    command = [sys.executable, "-m", "gpu_check.worker"]
    supervisor = Supervisor(lambda t: [*command, json.dumps(t)], env, REPO, budget, log)
    keys = [r.key for r in rows]
    for group in [[key] for key in keys] if profile.fresh_process_per_row else [keys]:
        supervisor.run(group, task)
    return supervisor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    profile = DRY_RUN if args.dry_run else GPU
    if not args.dry_run and not cuda_available():
        print("gpu_check: no CUDA device here; --dry-run runs the same code on the CPU", file=sys.stderr)
        return 2
    deadline = started + profile.deadline_s
    offload_dir = args.offload_dir or tempfile.gettempdir()
    env = worker_env(profile)

    rows = selected_rows(args.only)
    precisions = supported_precisions()
    results = {
        r.key: {"key": r.key, "status": "skipped", "reason": reason}
        for r in rows
        if (reason := skip_reason(r, precisions, cuda=not args.dry_run))
    }

    rows_done = threading.Event()
    tiny: TinyJobCheck | None = None
    if not args.no_tiny_job:
        gate = None if profile.tiny_job_alongside_rows else rows_done
        tiny = TinyJobCheck(REPO, profile.tiny_job_steps, profile.tiny_job_signal_step, deadline, env, gate)
        tiny.start()

    reserve = profile.tiny_job_reserve_s if tiny else 0.0
    by_key = {r.key: r for r in rows}

    def budget(key: str) -> float:
        return min(profile.row_budget(by_key[key]), deadline - time.monotonic() - reserve)

    task = {"profile": profile.name, "device": "cpu" if args.dry_run else "cuda", "offload_dir": offload_dir}
    supervisor = measure_rows([r for r in rows if r.key not in results], profile, task, env, budget)
    results |= supervisor.results
    rows_done.set()
    tiny_result = tiny.finish() if tiny else None

    probe = supervisor.probe or {}
    data = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
        "profile": profile,
        "probe": {k: v for k, v in probe.items() if k != "event"},
        "offload_dir": offload_dir,
        "offload_fs": filesystem(offload_dir),
        "rows": [report.derive(r, results[r.key], probe.get("bf16_matmul_flops")) for r in rows],
        "tiny_job": tiny_result.as_dict()
        if tiny_result
        else {"status": "skipped", "reason": "--no-tiny-job"},
        "tiny_job_summary": tiny_result.summary() if tiny_result else "tiny job: skipped (--no-tiny-job)",
        "elapsed_s": time.monotonic() - started,
    }
    text = report.render(data)
    markdown, json_path = report.write(data, text, args.out)
    print()
    print(text, end="")
    print(f"written: {markdown}, {json_path}")
    return 0
