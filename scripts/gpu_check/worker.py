"""The worker process: measures the rows it is given and reports each as an event line on stdout.

    python -m gpu_check.worker '{"profile": "gpu", "device": "cuda", "probe": true, "rows": ["bf16"]}'

Events are single lines, ``EVENT_PREFIX`` then JSON, so the supervisor can tell them from what libraries
print. An out-of-memory error or any other exception ends its row, not the worker: the row is reported
with what was measured up to then, and the next row starts. A hang or a crash is the supervisor's to see
(it holds each row to its time budget).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from gpu_check.flops import bf16_matmul_rate
from gpu_check.measure import Memory, Setup, measure_row, model_config, row_facts
from gpu_check.rows import DRY_RUN, GPU, ROWS
from gpu_check.supervise import EVENT_PREFIX

PROFILES = {p.name: p for p in (GPU, DRY_RUN)}
ROWS_BY_KEY = {r.key: r for r in ROWS}
# The libraries whose versions decide what was measured.
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface-hub",
    "lycoris-lora",
    "optimum-quanto",
    "safetensors",
)


def emit(event: str, **fields: Any) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def probe(setup: Setup) -> dict[str, Any]:
    """The machine, and the bf16 matmul rate the floor is computed from."""
    device = setup.device
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        facts["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    side = setup.profile.matmul_side
    facts["matmul_side"] = side
    facts["bf16_matmul_flops"] = bf16_matmul_rate(device, side)
    return facts


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "CPU")
    return f"{model}, {os.cpu_count()} cores"


def run_row(key: str, setup: Setup) -> None:
    row = ROWS_BY_KEY[key]
    result: dict[str, Any] = {"key": key}
    memory = Memory(setup.device)
    try:
        result["phase"] = "estimate"
        result |= row_facts(row, setup)
        measure_row(row, setup, lambda i, s, w: emit("step", key=key, index=i, seconds=s, warmup=w), result)
        result["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        result |= {
            "status": "oom",
            "reason": f"out of memory in {result.get('phase', 'setup')}: {first_line(exc)}",
        }
        result["oom_peak"] = memory.peaks()
    except Exception as exc:  # a row's failure is a finding to report, not the end of the check
        traceback.print_exc()
        result |= {
            "status": "error",
            "reason": f"{type(exc).__name__} in {result.get('phase', 'setup')}: {first_line(exc)}",
        }
    finally:
        memory.reset()
    emit("row", **result)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str]) -> int:
    task = json.loads(argv[0])
    profile = PROFILES[task["profile"]]
    setup = Setup(torch.device(task["device"]), model_config(profile), profile, task.get("offload_dir"))
    if task.get("probe"):
        emit("probe", **probe(setup))
    for key in task["rows"]:
        run_row(key, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
