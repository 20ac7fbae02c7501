"""The disk a run will take on the work directory, against the free space of its file system (an estimate).

What a run writes there: the remote datasets fetched into ``data/`` (local ones are read in place), the
latent and text caches, a remote base model fetched into ``models/``, the transformer offloaded to
``offload/`` when group offload goes to disk, ``checkpoints_total_limit`` checkpoints plus the one being
written before the oldest is rotated away, and the output (adapter or full-rank transformer; validation
images are small and not counted). Sizes come from the listings ``check`` already made and from the
parameter counts of the VRAM estimate, so they are rough; what the work directory already holds counts as
room the run has.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.check.access import Access
from job.check.estimate import _OPTIMIZER_STATES, CacheEstimate, VramEstimate
from job.config.loader import ResolvedConfig
from job.config.paths import is_remote
from job.data.location import is_fetched
from job.errors import ExitCode
from job.fetch.model import diffusers_files
from job.oserrors import human_size, nearest_existing, tree_size
from job.workdir import WorkDir

# LoKr weights, EMA and optimizer state are kept in float32 in a checkpoint.
_FP32 = 4
# Full-rank (ZeRO): fp32 master weights and two Adam moments (12 bytes a parameter) and 16-bit weights.
_FULL_RANK_CHECKPOINT_BYTES = 14


@dataclass(frozen=True)
class DiskEstimate:
    workdir: str
    measured: str  # the nearest existing folder: the file system whose free space was read
    parts: dict[str, int]  # data, caches, model, offload, checkpoints, output → bytes
    checkpoints_kept: int
    present_bytes: int  # already in the work directory (fetched data, warm caches, …)
    free_bytes: int
    writable: bool

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def short_bytes(self) -> int:
        """How much more the run needs than the file system has free (0: enough)."""
        return max(0, self.total_bytes - self.present_bytes - self.free_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": self.workdir,
            "measured": self.measured,
            "estimate_bytes": self.total_bytes,
            "parts": self.parts,
            "checkpoints_kept": self.checkpoints_kept,
            "present_bytes": self.present_bytes,
            "free_bytes": self.free_bytes,
            "short_bytes": self.short_bytes,
            "writable": self.writable,
        }


def disk_estimate(
    cfg: ResolvedConfig,
    workdir: WorkDir,
    access: list[Access],
    cache: CacheEstimate | None,
    vram: VramEstimate | None,
    steps: int,
) -> DiskEstimate:
    job = cfg.job
    listed = {a.what: a.sizes or {} for a in access}
    data = sum(
        sum(listed.get(f"dataset {d.id!r}", {}).values())
        for d in cfg.datasets
        if is_fetched(d) or d.type == "huggingface"
    )
    model_files = listed.get("base model", {}) if _fetched_model(job.model_source) else {}
    model = sum(model_files.get(key, 0) for key in diffusers_files(model_files))
    parameters = vram.parameters if vram else 0
    trained = vram.adapter_parameters if vram else 0
    if job.model_type == "full":
        checkpoint, output = parameters * _FULL_RANK_CHECKPOINT_BYTES, parameters * 2
    else:
        copies = 1 + _OPTIMIZER_STATES.get(job.optimizer, 2) + (1 if job.use_ema else 0)
        checkpoint, output = trained * _FP32 * copies, trained * _FP32
    written = math.ceil(steps / job.checkpoint_step_interval) if steps else 0
    kept = min(written, (job.checkpoints_total_limit or written) + 1)
    offload = parameters * 2 if job.enable_group_offload and job.group_offload_to_disk_path else 0
    parts = {
        "data": data,
        "caches": cache.total_bytes if cache else 0,
        "model": model,
        "offload": offload,
        "checkpoints": checkpoint * kept,
        "output": output,
    }
    measured = nearest_existing(workdir.root)
    return DiskEstimate(
        workdir=str(workdir.root),
        measured=str(measured),
        parts=parts,
        checkpoints_kept=kept,
        present_bytes=tree_size(workdir.root) if workdir.root.is_dir() else 0,
        free_bytes=shutil.disk_usage(measured).free,
        writable=os.access(measured, os.W_OK | os.X_OK),
    )


def _fetched_model(source: str) -> bool:
    """A remote folder or a Hub repo id is fetched into ``models/``; a local folder is used in place."""
    return is_remote(source) or not Path(source).expanduser().is_dir()


def disk_problems(disk: DiskEstimate) -> list[tuple[int, str]]:
    """(exit code, message): a file system too small is 75 (another node may have the room), one this
    process cannot write is 4."""
    problems = []
    if not disk.writable:
        problems.append(
            (
                int(ExitCode.NO_PERMISSION),
                f"work directory {disk.workdir}: {disk.measured} is not writable by uid {os.getuid()}: "
                "mount it read-write or point --workdir elsewhere",
            )
        )
    if disk.short_bytes:
        problems.append(
            (
                int(ExitCode.TRANSIENT),
                f"work directory {disk.workdir}: the run needs about {human_size(disk.total_bytes)} there "
                f"(estimate: {describe_parts(disk)}; {human_size(disk.present_bytes)} already there), but only "
                f"{human_size(disk.free_bytes)} is free on the file system of {disk.measured}: run on a node "
                "with more disk, point --workdir at a larger volume or lower checkpoints_total_limit",
            )
        )
    return problems


def describe_parts(disk: DiskEstimate) -> str:
    names = {"checkpoints": f"checkpoints ×{disk.checkpoints_kept}"}
    return ", ".join(f"{names.get(k, k)} {human_size(v)}" for k, v in disk.parts.items() if v) or "nothing"
