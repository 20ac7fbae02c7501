"""The image's build cost as a user pays it: a cold `docker build`, then a rebuild after a code-only change.

Each round empties the engine's build cache and images (the base stays), builds the real Dockerfile cold
(A), changes one line under job/ in a copy of the build context and builds again (B): A B A B ... on a
private engine (scripts/docker_sandbox.py: Debian base by debootstrap, CPU torch from a local index).
After the rounds it reads the layers with `docker save` and reports the image size and the bytes a
code-only change adds to a pull (goal: under 5 MB, the project in a layer of its own).

    python scripts/bench_image.py                  # 5 rounds, the figures appended to BENCHMARKS.md
    python scripts/bench_image.py --rounds 3 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docker_sandbox

ROOT = Path(__file__).resolve().parent.parent
CODE_LAYER_GOAL = 5_000_000
TAG = "lokr-job:bench"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s (range {min(values):.1f}–{max(values):.1f})"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores (load average {load}); no GPU; Docker {docker_version()}"


def docker_version() -> str:
    version = docker_sandbox.run([docker_sandbox.CLIENT, "--version"], what="docker --version").stdout
    return version.strip().removeprefix("Docker version ")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    cold: list[float] = []
    code_only: list[float] = []
    with docker_sandbox.engine() as dockerd, docker_sandbox.torch_index() as index:
        base = docker_sandbox.make_base(dockerd)
        for round_number in range(1, args.rounds + 1):
            dockerd.docker("builder", "prune", "--all", "--force")
            for tag in (TAG, f"{TAG}-changed"):
                dockerd.docker("image", "rm", "--force", tag, check=False)
            with tempfile.TemporaryDirectory(prefix="lokr-context-") as folder:
                context = docker_sandbox.copy_context(Path(folder))
                cold.append(
                    docker_sandbox.build(dockerd, TAG, base=base, index_url=index.url, context=context)
                )
                with (context / "job" / "__init__.py").open("a") as module:
                    module.write(f"\n# code-only change {round_number}\n")
                code_only.append(
                    docker_sandbox.build(
                        dockerd, f"{TAG}-changed", base=base, index_url=index.url, context=context
                    )
                )
            print(f"round {round_number}: cold {cold[-1]:.1f} s, code-only {code_only[-1]:.1f} s", flush=True)
        before = docker_sandbox.layers(dockerd, TAG)
        after = docker_sandbox.layers(dockerd, f"{TAG}-changed")
        size = docker_sandbox.image_bytes(dockerd, TAG)

    kept = {diff_id for diff_id, _ in before}
    added = sum(layer_size for diff_id, layer_size in after if diff_id not in kept)
    largest = max(layer_size for _, layer_size in before)
    verdict = "met" if added < CODE_LAYER_GOAL else "MISSED"
    lines = [
        f"## Image build: cold and after a code-only change ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}.  ",
        f"Command: `python scripts/bench_image.py --rounds {args.rounds}` (A cold, B code-only, interleaved).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| cold build (empty build cache; Debian base, CPU torch from a local index, PyPI for the rest) | {spread(cold)} |",
        f"| rebuild after a one-line change under job/ | {spread(code_only)} |",
        f"| image size (CPU torch; the CUDA wheels add gigabytes on the real base) | {size / 1e9:.2f} GB |",
        f"| largest layer (the venv with the dependencies) | {largest / 1e6:.0f} MB |",
        f"| layers a code-only change adds to a pull | {added / 1e6:.2f} MB: goal < 5 MB {verdict} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        with (ROOT / "BENCHMARKS.md").open("a") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
