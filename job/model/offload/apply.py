"""From the job's config to group offload: the offloader installed on the transformer, or only its disk
files written (``warm_only``)."""

from __future__ import annotations

from pathlib import Path

import torch

from job.config.schema import JobConfig
from job.errors import ConfigError
from job.model.offload.hooks import GroupOffload
from job.model.offload.settings import offload_settings


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
    and leaves the transformer untouched (for a stage that pays for them ahead of training; ``lokr-job
    warm`` does not call it yet, so today ``train`` writes them before step 1).
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
