"""What every benchmark script shares: a description of the machine and appending to BENCHMARKS.md."""

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine(software: str) -> str:
    """CPU model, cores and load (benchmarks on a shared box need the load next to the figure)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores (load average {load}); {software}"


def append_section(title: str, script: str, argv: list[str], software: str, table: str) -> None:
    """Append a dated section with the machine and the exact command to BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([f"python scripts/{script}", *argv])
    section = f"\n## {title} ({stamp})\n\nMachine: {machine(software)}.  \nCommand: `{command}`\n\n{table}\n"
    with path.open("a", encoding="utf-8") as file:
        file.write(section)
    print(f"appended to {path}")
