"""From the job's config to group offload: the offloader installed on the transformer (``train``), or only
its disk files written (``warm_only``; ``lokr-job warm`` through ``write_offload_files``)."""

from __future__ import annotations

from pathlib import Path

import torch

from job.config.schema import JobConfig
from job.errors import ConfigError
from job.model.offload.hooks import GroupOffload
from job.model.offload.settings import offload_settings
from job.model.offload.store import DiskReport


def apply_group_offload(
    transformer: torch.nn.Module,
    job: JobConfig,
    offload_dir: Path,
    onload_device: torch.device | str,
    *,
    warm_only: bool = False,
) -> GroupOffload | None:
    """Group-offload ``transformer``'s frozen block weights as ``job`` says; None when it is not enabled.

    Call after the base model is cast/quantized and LoKr is attached, with the transformer anywhere (the
    weights are moved group by group, never all at once). ``warm_only`` writes or validates the disk files
    and leaves the transformer untouched (``write_offload_files``, for the warm stage).
    """
    if not job.enable_group_offload:
        return None
    if job.model_type == "full":
        raise ConfigError(
            "enable_group_offload offloads the frozen base weights a LoKr adapter trains against; with "
            "model_type full every weight trains: use deepspeed_config (ZeRO-3 with offload) instead"
        )
    onload_device = torch.device(onload_device)
    settings = offload_settings(job, Path(offload_dir), onload_device)
    return GroupOffload(
        transformer, onload_device, settings, prefetch=settings.use_stream, install=not warm_only
    )


def write_offload_files(
    job: JobConfig, model_folder: Path, offload_dir: Path, onload_device: torch.device
) -> DiskReport | None:
    """The warm stage's part of group offload: the disk files, written from the base model loaded and
    cast or quantized as ``train`` prepares it, so ``train`` (or a later warm) finds them valid and only
    checks them. None when the weights are not offloaded to disk."""
    if not (job.enable_group_offload and job.group_offload_to_disk_path):
        return None
    from job.model.transformer import load_dtype, load_transformer, prepare_base_model

    transformer = prepare_base_model(
        load_transformer(model_folder, dtype=load_dtype(job)), job, torch.device(onload_device)
    )
    offload = apply_group_offload(transformer, job, offload_dir, onload_device, warm_only=True)
    return offload.disk if offload is not None else None
