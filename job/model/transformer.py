"""The AuraFlow transformer as training sees it: loaded, cast or quantized, frozen, on the device.

Order matters (DESIGN §4): cast to bf16, quantize, freeze, ``requires_grad_(False)`` again, and only then
does the caller attach LoKr. LoKr first and quantize second silently trains nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from job.config.schema import JobConfig
from job.errors import ConfigError
from job.model.checkpointing import enable_block_checkpointing
from job.oserrors import map_os_error

if TYPE_CHECKING:
    from diffusers import AuraFlowTransformer2DModel

log = logging.getLogger("lokr")

QUANTO_PRECISIONS = {"int8-quanto": "qint8", "int4-quanto": "qint4"}


def load_transformer(folder: str | Path, *, dtype: torch.dtype | None = None) -> AuraFlowTransformer2DModel:
    """Load the transformer from a local diffusers folder: a pipeline's (``transformer/`` inside) or its own.

    ``job.model.source.local_model_path`` says which folder: training never downloads (``fetch`` does).
    """
    from diffusers import AuraFlowTransformer2DModel

    folder = Path(folder).expanduser()
    own = not (folder / "transformer").is_dir() and (folder / "config.json").is_file()
    try:
        return AuraFlowTransformer2DModel.from_pretrained(
            folder, subfolder=None if own else "transformer", torch_dtype=dtype, local_files_only=True
        )
    except OSError as exc:
        # diffusers reports a missing model and an unreadable file alike; the latter is access (exit 4).
        if (refused := map_os_error(exc, None)) is not None:
            raise refused from exc
        raise ConfigError(
            f"pretrained_model_name_or_path: cannot load the AuraFlow transformer from {folder}: {exc}. "
            "Point it at a diffusers AuraFlow folder or repo id (run lokr-job fetch for a remote one)"
        ) from exc


def load_dtype(job: JobConfig) -> torch.dtype:
    """The dtype the base model's weights are loaded in, and stay in unless quantized: SimpleTuner's
    ``weight_dtype``. With ``no_change`` that follows ``mixed_precision`` (bf16, or fp32 when it is ``no``);
    a cast or quantized model is bf16 (simpletuner/helpers/configuration/cmd_args.py, where
    ``args.weight_dtype`` is set; ``ModelFoundation.load_model`` in simpletuner/helpers/models/common.py
    loads with it as ``torch_dtype``)."""
    if job.base_model_precision == "no_change" and job.mixed_precision == "no":
        return torch.float32
    return torch.bfloat16


def prepare_base_model(
    transformer: AuraFlowTransformer2DModel, job: JobConfig, device: torch.device
) -> AuraFlowTransformer2DModel:
    """Apply ``base_model_precision``, ``quantize_via`` and ``gradient_checkpointing`` (with its
    ``gradient_checkpointing_interval``); freeze everything.

    The transformer ends on ``device``, except under ``enable_group_offload``: then it stays where it is
    (and is quantized there), and group offload moves its weights to the device a group at a time.
    """
    transformer.requires_grad_(False)
    precision = job.base_model_precision
    move = not job.enable_group_offload
    if transformer.dtype != load_dtype(job):
        transformer.to(dtype=load_dtype(job))
    if precision in QUANTO_PRECISIONS:
        if job.quantize_via == "accelerator" and move:
            transformer.to(device)
        _quantize(transformer, QUANTO_PRECISIONS[precision])
    if move:
        transformer.to(device)
    if job.gradient_checkpointing:
        enable_block_checkpointing(transformer, job.gradient_checkpointing_interval)
    transformer.train()
    return transformer


def _quantize(transformer: torch.nn.Module, weights: str) -> None:
    import optimum.quanto as quanto

    quanto.quantize(transformer, weights=getattr(quanto, weights))
    quanto.freeze(transformer)
    # freeze() leaves the quantized weights with requires_grad=True, and backward then breaks.
    transformer.requires_grad_(False)
    log.info("quantized the transformer's weights to %s (optimum-quanto)", weights)
