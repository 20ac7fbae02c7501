"""What gpu_check measures: the rows of issue 17's table, and the two profiles (the GPU, the CPU dry run).

Standard library only: the supervising process reads this without importing torch, so it never touches
CUDA itself (each row's worker process owns the GPU alone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Offload = Literal["none", "ram", "disk"]


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    precision: str  # a base_model_precision value
    checkpointing: bool
    offload: Offload
    # CUDA (streams and pinned memory, fp8 or 4-bit kernels): nothing to measure without.
    needs_cuda: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ROWS: tuple[RowSpec, ...] = (
    RowSpec("bf16", "bf16", "bf16", False, "none"),
    RowSpec("bf16-ckpt", "bf16 + ckpt", "bf16", True, "none"),
    RowSpec("int8-ckpt", "int8-quanto + ckpt", "int8-quanto", True, "none"),
    # The seed's flags: block level, one block a group, streams (off CUDA the job turns streams off).
    RowSpec("int8-ram", "int8-quanto + ckpt + RAM offload, streams", "int8-quanto", True, "ram", True),
    RowSpec("int8-disk", "int8-quanto + ckpt + disk offload", "int8-quanto", True, "disk"),
    RowSpec("int4-ckpt", "int4-quanto + ckpt", "int4-quanto", True, "none"),
    RowSpec("int8-torchao", "int8-torchao + ckpt", "int8-torchao", True, "none"),
    # float8 kernels, and bitsandbytes' 4-bit ones, need an NVIDIA GPU (lokr-job refuses them without one).
    RowSpec("fp8-torchao", "fp8-torchao + ckpt", "fp8-torchao", True, "none", True),
    RowSpec("nf4-bnb", "nf4-bnb + ckpt", "nf4-bnb", True, "none", True),
)


@dataclass(frozen=True)
class Profile:
    """How big and how long: the full-size model on a GPU, or the tiny one on the CPU."""

    name: str
    model: str  # "auraflow" (v0.3's config, random bf16 weights) or "tiny"
    resolution: int
    caption_tokens: int
    warmup: int
    steps: int
    matmul_side: int
    deadline_s: float  # the whole check, rows and tiny job
    row_budget_s: dict[str, float]  # by offload mode
    tiny_job_steps: int
    tiny_job_signal_step: int
    # On the GPU each row gets a fresh process (clean memory and peak statistics), and the tiny job trains
    # after the rows (it would share the GPU with them) in the time they leave it; on the CPU one worker
    # takes every row (its imports are most of a tiny row's time) and the tiny job trains alongside.
    fresh_process_per_row: bool
    tiny_job_alongside_rows: bool
    tiny_job_reserve_s: float  # kept from the rows' budgets for the tiny job when it trains after them
    threads: int | None  # OMP_NUM_THREADS for every process; None: torch's default

    def row_budget(self, row: RowSpec) -> float:
        return self.row_budget_s[row.offload]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# An H100 does a bf16 1024 px step in about 0.4 s: warm-up 3 + 10 steps is ~10 s a row. The budgets leave
# room for the worker's imports (~5 s) and building 6.8B random weights; the offload rows also quantize in
# host memory (as a run with offload does), pin or write ~7 GB, and move every block each pass. 420 s in
# all leaves the call's pip install and a margin inside 8 minutes.
GPU = Profile(
    name="gpu",
    model="auraflow",
    resolution=1024,
    caption_tokens=120,
    warmup=3,
    steps=10,
    matmul_side=8192,
    deadline_s=420,
    row_budget_s={"none": 60, "ram": 100, "disk": 150},
    tiny_job_steps=96,
    tiny_job_signal_step=6,
    fresh_process_per_row=True,
    tiny_job_alongside_rows=False,
    tiny_job_reserve_s=100,
    threads=None,
)
# The same code on the tiny model: seconds, on a loaded 2-core machine, with one worker for every row.
DRY_RUN = Profile(
    name="dry-run",
    model="tiny",
    resolution=64,
    caption_tokens=8,
    warmup=1,
    steps=2,
    matmul_side=256,
    # Generous: a row takes ~2 s here, but CI's 2 cores also run the tiny job beside the rows, and a
    # budget the machine's load can break would make the dry run fail for no fault of the script.
    deadline_s=480,
    row_budget_s={"none": 120, "ram": 120, "disk": 120},
    tiny_job_steps=48,
    tiny_job_signal_step=3,
    fresh_process_per_row=False,
    tiny_job_alongside_rows=True,
    tiny_job_reserve_s=0,
    # A shared CPU machine: one thread each, or torch's threads fight the neighbours' (BENCHMARKS.md).
    threads=1,
)


def skip_reason(row: RowSpec, precisions: tuple[str, ...], cuda: bool) -> str | None:
    """Why a row cannot be measured here, or None. ``precisions``: the base_model_precision values
    lokr-job accepts (read from its config schema, so a row starts counting once lokr-job supports it)."""
    if row.precision not in precisions:
        return f"not available yet: lokr-job has no base_model_precision {row.precision}"
    if row.needs_cuda and not cuda:
        return "needs CUDA (streams, pinned memory)" if row.offload != "none" else "needs CUDA (its kernels)"
    if row.precision == "nf4-bnb":
        # The rows build their random weights in memory; lokr-job applies nf4 while loading from disk.
        return "not measured here: lokr-job quantizes nf4-bnb while loading a model folder (measure a run)"
    return None
