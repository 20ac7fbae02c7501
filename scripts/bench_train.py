"""Benchmark ``lokr-job train`` as a whole process against a bare training loop in a process of its own.

    python scripts/bench_train.py [--steps 1000] [--rounds 5] [--threads 1] [--no-append]

Builds the tiny job (``lokr-job tiny``) and warms its caches once (``lokr-job warm``), so both sides train on
cached batches. Then one untimed warm-up pair and ``--rounds`` timed rounds, A B A B ...:

- A: ``python -m job train --config ... --workdir ... --set max_train_steps=N --set
  checkpoint_step_interval=500``: the tiny config otherwise as ``lokr-job tiny`` writes it (adamw, norm
  clipping, fp32, checkpoints_total_limit 2, the validation render at the end), with the schema's default
  checkpoint interval rather than the tiny job's 8. ``checkpoints/`` and ``output/`` are removed before
  each run, so each starts fresh as a user's first run does.
- B: this file run with ``--bare-loop``: loads the same transformer and LoKr (same seed), trains N steps of
  the same maths (σ, noise and draws from the job's per-step generator, shift 3, l2 flow-matching loss,
  norm clipping at 1, AdamW with the job's defaults) on the same batches (read from the cache beforehand
  in the trainer's order, loaded from one file when B starts) with a plain loop, and saves the adapter.

Each process is timed whole: wall from start to reap, and CPU user+sys from the reaped child's rusage. The
steady state is the stretch between the ``step k/N`` lines each side prints every 10 steps, from k = N/10
(warm-up left out) to k = N, as this process reads them: wall, and the child's CPU from /proc/PID/stat at
those two lines. It holds the per-step work and whatever falls between steps (A's checkpoint at step 500),
not start-up nor the end (final checkpoint, validation, adapter write); "outside the steady state" is the
whole-process CPU less the steady stretch's. The goal: A/B whole-process wall at most 1.05; on a shared
machine wall swings with the other load, so CPU is given beside it. ``--threads`` sets both processes'
torch CPU threads (on a shared 2-core machine two threads ran up to 30x slower). Prints a table and
appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GOAL = 1.05
CHECKPOINT_INTERVAL = 500  # the schema's default checkpoint_step_interval
LOG_EVERY = 10  # lokr-job logs "step k/N" every 10 steps; the bare loop does the same
SEED = 42  # the tiny config's seed
RANK = 0
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed A B rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in both processes")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--bare-loop", nargs=4, metavar=("JOB", "BATCHES", "STEPS", "OUT"), help="(internal)")
    args = parser.parse_args()
    if args.bare_loop:
        job, batches, steps, out = args.bare_loop
        bare_loop(Path(job), Path(batches), int(steps), Path(out))
        return
    if args.steps < 2 * LOG_EVERY or args.steps % LOG_EVERY:
        parser.error(f"--steps must be a multiple of {LOG_EVERY}, at least {2 * LOG_EVERY}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        _run_ok([sys.executable, "-m", "job", "tiny", str(root / "tiny")], root, env)
        config = root / "tiny" / "config" / "config.json"
        workdir = root / "work"
        _run_ok(
            [sys.executable, "-m", "job", "warm", "--config", str(config), "--workdir", str(workdir)],
            root,
            env,
        )
        batches = root / "batches.safetensors"
        _write_batches(config, workdir, args.steps, batches)
        job_train = [sys.executable, "-m", "job", "train", "--config", str(config), "--workdir", str(workdir)]
        job_train += ["--set", f"max_train_steps={args.steps}"]
        job_train += ["--set", f"checkpoint_step_interval={CHECKPOINT_INTERVAL}"]
        bare_args = (root / "tiny", batches, args.steps, root / "bare")
        bare = [sys.executable, __file__, "--bare-loop", *map(str, bare_args)]
        pairs = []
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            shutil.rmtree(workdir / "output", ignore_errors=True)
            a = _timed(job_train, root, env, args.steps)
            b = _timed(bare, root, env, args.steps)
            print(f"round {round_}: A {a}  B {b}", file=sys.stderr)
            if round_:
                pairs.append((a, b))
    table = _table(pairs, args.steps, args.threads)
    print(table)
    if not args.no_append:
        from benchmarks import append_section

        append_section(
            "Training overhead: `lokr-job train` vs a bare loop, whole processes paired",
            "bench_train.py",
            sys.argv[1:],
            _torch_software(),
            table,
        )


@dataclass(frozen=True)
class Run:
    wall: float  # seconds, process start to reap
    cpu: float  # user + sys seconds of the reaped child
    steady: float  # wall seconds per step between the step N/10 and step N lines
    steady_cpu: float  # CPU seconds per step over the same stretch
    outside_cpu: float  # CPU seconds outside that stretch: start-up, warm-up steps and the end

    def __str__(self) -> str:
        return (
            f"wall {self.wall:.2f} s, cpu {self.cpu:.2f} s, steady {self.steady * 1000:.2f} ms/step "
            f"(cpu {self.steady_cpu * 1000:.2f}), outside {self.outside_cpu:.2f} s cpu"
        )


def _timed(command: list[str], cwd: Path, env: dict[str, str], steps: int) -> Run:
    """Run ``command`` to its end; its wall and CPU, whole and between its step N/10 and step N lines."""
    first = max(LOG_EVERY, steps // 10 // LOG_EVERY * LOG_EVERY)
    seen: dict[int, tuple[float, float]] = {}  # step -> (wall clock, child CPU) when its line arrived
    tail: list[str] = []
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if (match := STEP_LINE.search(line)) and int(match.group(2)) == steps:
            step = int(match.group(1))
            if step in (first, steps) and step not in seen:
                seen[step] = (time.perf_counter(), _cpu_so_far(process.pid))
        tail = [*tail[-39:], line]
    # wait4, not Popen.wait: the child's own rusage, not the sum over every child reaped so far.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or len(seen) != 2:
        raise SystemExit(f"{' '.join(command[1:4])} failed (exit {process.returncode}):\n" + "".join(tail))
    cpu = usage.ru_utime + usage.ru_stime
    window_cpu = seen[steps][1] - seen[first][1]
    return Run(
        wall=wall,
        cpu=cpu,
        steady=(seen[steps][0] - seen[first][0]) / (steps - first),
        steady_cpu=window_cpu / (steps - first),
        outside_cpu=cpu - window_cpu,
    )


def _cpu_so_far(pid: int) -> float:
    """User + sys seconds of a running process, all its threads (Linux /proc, clock-tick resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # past "pid (comm) ": the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _run_ok(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed:\n{result.stderr[-3000:]}")


def _write_batches(config: Path, workdir: Path, steps: int, path: Path) -> None:
    """The batches ``lokr-job train`` reads, step by step in its order, into one file for the bare loop."""
    from safetensors.torch import save_file

    from job.cache.dataset import TrainingData
    from job.context import open_context

    ctx = open_context(str(config), workdir, None, [f"max_train_steps={steps}"])
    data = TrainingData.open(ctx.config, ctx.workdir)
    tensors = {}
    for step in range(steps):
        batch = data.batch(*divmod(step, data.batches_per_epoch))
        tensors |= {f"{step}.latents": batch.latents, f"{step}.embeds": batch.prompt_embeds}
        tensors[f"{step}.mask"] = batch.prompt_mask
    save_file(tensors, str(path))


def bare_loop(job: Path, batches_file: Path, steps: int, out: Path) -> None:
    """B: what someone would write by hand to train the same LoKr, and nothing else."""
    import hashlib

    import json5
    import torch
    from diffusers import AuraFlowTransformer2DModel
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import load_file

    batches = load_file(str(batches_file))
    transformer = AuraFlowTransformer2DModel.from_pretrained(job / "model", subfolder="transformer")
    transformer.requires_grad_(False)
    lycoris = json5.loads((job / "config" / "lycoris_config.json").read_text())
    LycorisNetwork.apply_preset(lycoris.pop("apply_preset"))
    torch.manual_seed(SEED)
    network = create_lycoris(transformer, lycoris.pop("multiplier"), **lycoris)
    network.apply_to()
    network.requires_grad_(True)
    parameters = list(network.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    shift = 3.0  # the schema's default flow_schedule_shift
    for step in range(steps):
        # The job's per-step generator: seeded by (seed, step, rank), so the draws are the job's own.
        digest = hashlib.blake2b(f"lokr-step:{SEED}:{step}:{RANK}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        latents, embeds, mask = (batches[f"{step}.{name}"] for name in ("latents", "embeds", "mask"))
        sigmas = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        noise = torch.randn(latents.shape, generator=generator)
        torch.rand(latents.shape[0], generator=generator)  # the caption-dropout draw (probability 0 here)
        sigma = sigmas.view(-1, 1, 1, 1)
        prediction = transformer(
            hidden_states=(1 - sigma) * latents + sigma * noise,
            encoder_hidden_states=embeds * mask.unsqueeze(-1).float(),
            timestep=sigmas,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(out / "pytorch_lora_weights.safetensors"), torch.float32, None)


def _spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _table(pairs: list[tuple[Run, Run]], steps: int, threads: int) -> str:
    rows = [
        ("whole process, wall s", lambda run: run.wall, 2),
        ("whole process, CPU user+sys s", lambda run: run.cpu, 2),
        (f"steady state (steps {steps // 10}–{steps}), wall ms/step", lambda run: run.steady * 1000, 2),
        ("steady state, CPU ms/step", lambda run: run.steady_cpu * 1000, 2),
        ("outside the steady state, CPU s", lambda run: run.outside_cpu, 2),
    ]
    lines = [
        f"| median (min–max) of {len(pairs)} rounds | bare loop (B) | `lokr-job train` (A) | A/B, per round |",
        "|---|---|---|---|",
    ]
    for name, value, digits in rows:
        a = [value(a) for a, _ in pairs]
        b = [value(b) for _, b in pairs]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        lines.append(f"| {name} | {_spread(b, digits)} | {_spread(a, digits)} | {_spread(ratios, 3)} |")
    wall = _verdict([a.wall / b.wall for a, b in pairs])
    cpu = _verdict([a.cpu / b.cpu for a, b in pairs])
    return "\n".join(lines) + (
        f"\n\nGoal: `lokr-job train` whole process ≤ {GOAL}× the bare loop: by wall {wall}; by CPU {cpu}. "
        f"{steps} steps per run, A B interleaved after one "
        f"untimed warm-up pair, {threads} torch thread(s), load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores at the end."
    )


def _verdict(ratios: list[float]) -> str:
    """Met or missed by the median per-round ratio, with how many rounds fell over the goal."""
    median = statistics.median(ratios)
    over = sum(ratio > GOAL for ratio in ratios)
    return f"**{'met' if median <= GOAL else 'missed'}** (median {median:.3f}; {over} of {len(ratios)} rounds over)"


def _torch_software() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{device}; torch {torch.__version__}"


if __name__ == "__main__":
    main()
