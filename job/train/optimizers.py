"""The optimizers a seed config may name, with SimpleTuner's default settings for each.

The adapter trains in fp32 except under ``adamw_bf16``, whose point is bf16 weights kept accurate by
optimi's Kahan-compensated updates (optimi turns Kahan summation on by itself for bf16 parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from job.errors import ConfigError

log = logging.getLogger("lokr")


def adapter_dtype(optimizer: str) -> torch.dtype:
    """The dtype the LoKr weights are kept in for this optimizer."""
    return torch.bfloat16 if optimizer == "adamw_bf16" else torch.float32


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if name in ("adamw_bf16", "optimi-adamw", "optimi-lion"):
        import optimi

        if name == "adamw_bf16":
            return optimi.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6)
        if name == "optimi-adamw":
            return optimi.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6)
        return optimi.Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    if name == "bnb-lion8bit-paged":
        return _paged_lion8bit(params, lr)
    if name == "prodigy":
        from prodigyopt import Prodigy

        if lr < 0.1:
            log.warning(
                "optimizer prodigy: learning_rate %g scales the step size Prodigy finds; it is meant to be "
                "about 1.0 (set learning_rate 1.0 unless you mean to damp it)",
                lr,
            )
        return Prodigy(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, d0=1e-6, d_coef=1.0)
    raise ConfigError(f"optimizer: {name!r} is not supported")


def _paged_lion8bit(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(
            "optimizer: bnb-lion8bit-paged needs bitsandbytes, which is not installed; install the 'bnb' "
            "extra (pip install 'lokr-job[bnb]') or choose optimi-lion"
        ) from exc
    if not torch.cuda.is_available():
        raise ConfigError(
            "optimizer: bnb-lion8bit-paged needs a CUDA GPU; on this machine choose optimi-lion"
        )
    return bitsandbytes.optim.PagedLion8bit(
        params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=4096
    )
