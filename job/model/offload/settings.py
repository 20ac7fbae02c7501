"""The config's group-offload flags resolved for one onload device: what the hooks and the disk store are
built from."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from job.config.schema import JobConfig

log = logging.getLogger("lokr")


@dataclass(frozen=True)
class OffloadSettings:
    """The config's group-offload flags, resolved for one onload device."""

    offload_type: Literal["block_level", "leaf_level"]
    blocks_per_group: int
    use_stream: bool
    disk_dir: Path | None


def offload_settings(job: JobConfig, offload_dir: Path, onload_device: torch.device) -> OffloadSettings:
    """Resolve the flags. Streams are silently off unless the onload device is CUDA (as the seed says);
    disk files go to ``group_offload_to_disk_path`` (a relative path lives under ``offload_dir``, the work
    directory's ``offload/``); without that key, offloaded weights stay in host RAM."""
    use_stream = job.group_offload_use_stream and torch.device(onload_device).type == "cuda"
    if job.group_offload_use_stream and not use_stream:
        log.info("group offload: streams need a CUDA onload device; continuing without them")
    disk_dir = None
    if job.group_offload_to_disk_path:
        disk_dir = Path(job.group_offload_to_disk_path).expanduser()
        if not disk_dir.is_absolute():
            disk_dir = Path(offload_dir) / disk_dir
    return OffloadSettings(job.group_offload_type, job.group_offload_blocks_per_group, use_stream, disk_dir)
