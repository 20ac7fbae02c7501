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
# torchao's weight-only configs: int8 runs anywhere, float8 needs fp8 tensor cores (compute capability 8.9+).
TORCHAO_PRECISIONS = {"int8-torchao": "Int8WeightOnlyConfig", "fp8-torchao": "Float8WeightOnlyConfig"}
_FP8_CAPABILITY = (8, 9)


def load_transformer(
    folder: str | Path, *, dtype: torch.dtype | None = None, precision: str = "no_change"
) -> AuraFlowTransformer2DModel:
    """Load the transformer from a local diffusers folder: a pipeline's (``transformer/`` inside) or its own.

    ``job.model.source.local_model_path`` says which folder: training never downloads (``fetch`` does).
    ``precision`` nf4-bnb is applied while loading (diffusers' ``BitsAndBytesConfig``: the weights are
    quantized as they reach the GPU); the others by ``prepare_base_model``.
    """
    from diffusers import AuraFlowTransformer2DModel

    folder = Path(folder).expanduser()
    quantization = {"quantization_config": _nf4_config()} if precision == "nf4-bnb" else {}
    try:
        return AuraFlowTransformer2DModel.from_pretrained(
            folder,
            subfolder=transformer_subfolder(folder),
            torch_dtype=dtype,
            local_files_only=True,
            **quantization,
        )
    except OSError as exc:
        # diffusers reports a missing model and an unreadable file alike; the latter is access (exit 4).
        if (refused := map_os_error(exc, None)) is not None:
            raise refused from exc
        raise ConfigError(
            f"pretrained_model_name_or_path: cannot load the AuraFlow transformer from {folder}: {exc}. "
            "Point it at a diffusers AuraFlow folder or repo id (run lokr-job fetch for a remote one)"
        ) from exc


def transformer_subfolder(source: str | Path) -> str | None:
    """Where a model's transformer is: None when ``source`` is a transformer's own folder, else the
    ``transformer/`` of a pipeline (a local pipeline folder, or a Hub repo id)."""
    folder = Path(source).expanduser()
    own = not (folder / "transformer").is_dir() and (folder / "config.json").is_file()
    return None if own else "transformer"


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
    elif precision in TORCHAO_PRECISIONS:
        if job.quantize_via == "accelerator" and move:
            transformer.to(device)
        _quantize_torchao(transformer, TORCHAO_PRECISIONS[precision])
    if move and precision != "nf4-bnb":  # bitsandbytes placed its 4-bit weights while loading
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


def _quantize_torchao(transformer: torch.nn.Module, config_name: str) -> None:
    import torchao.quantization

    torchao.quantization.quantize_(transformer, getattr(torchao.quantization, config_name)())
    transformer.requires_grad_(False)
    log.info("quantized the transformer's weights with torchao's %s", config_name)


def _nf4_config() -> object:
    import torch
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def precision_problem(precision: str) -> str | None:
    """Why ``base_model_precision`` cannot run on this machine, or None. ``check`` accepts every precision
    (it plans for the machine the job will run on); ``run`` and ``train`` refuse with this reason."""
    import importlib.util

    import torch

    if precision == "fp8-torchao":
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= _FP8_CAPABILITY:
            return None
        here = (
            f"{torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
            if torch.cuda.is_available()
            else "no CUDA GPU"
        )
        return (
            "base_model_precision fp8-torchao: torchao's float8 weight-only kernels need an NVIDIA GPU of compute "
            f"capability 8.9 or newer (Ada: L4, L40S, RTX 4090; Hopper: H100, H200), and this machine has {here}; "
            "use int8-torchao or int8-quanto here"
        )
    if precision == "nf4-bnb":
        if importlib.util.find_spec("bitsandbytes") is None:
            return (
                "base_model_precision nf4-bnb needs bitsandbytes, which is not installed: install the 'bnb' extra "
                "(pip install 'lokr-job[bnb]'), or use int8-quanto"
            )
        if not torch.cuda.is_available():
            return (
                "base_model_precision nf4-bnb: bitsandbytes' 4-bit kernels need a CUDA GPU, and this machine has "
                "none; use int8-quanto or int8-torchao here"
            )
    return None
