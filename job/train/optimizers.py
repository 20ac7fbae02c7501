"""The optimizers a seed config may name, with SimpleTuner's default settings for each.

As in SimpleTuner (simpletuner/helpers/training/optimizer_param.py, ``optimizer_parameters`` and
``convert_arg_to_parameters``): an optimizer starts from its default settings, ``optimizer_config``
(``key=value`` pairs) overrides them, and ``optimizer_beta1`` with ``optimizer_beta2`` override ``betas``
last. A setting the optimizer's constructor does not take is dropped with a warning, as SimpleTuner drops
it. ``adam_beta1``/``adam_beta2``/``adam_epsilon``/``adam_weight_decay`` are not read: SimpleTuner hands them
only to DeepSpeed's built-in optimizer, which lokr-job never uses.

The adapter trains in fp32 except under ``adamw_bf16``, whose point is bf16 weights kept accurate by
optimi's Kahan-compensated updates (optimi turns Kahan summation on by itself for bf16 parameters).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from job.config.optimizer_config import parse_optimizer_config
from job.config.schema import JobConfig
from job.errors import ConfigError

log = logging.getLogger("lokr")

# Each optimizer's settings when the config overrides none (SimpleTuner's ``default_settings``).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8},
    "adamw_bf16": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6},
    "optimi-adamw": {"betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6},
    "optimi-lion": {"betas": (0.9, 0.99), "weight_decay": 0.0},
    "bnb-lion8bit-paged": {"betas": (0.9, 0.99), "weight_decay": 0.0, "min_8bit_size": 4096},
    "prodigy": {"betas": (0.9, 0.99), "weight_decay": 0.0, "d0": 1e-6, "d_coef": 1.0},
}


def adapter_dtype(optimizer: str) -> torch.dtype:
    """The dtype the LoKr weights are kept in for this optimizer."""
    return torch.bfloat16 if optimizer == "adamw_bf16" else torch.float32


def optimizer_overrides(job: JobConfig) -> dict[str, Any]:
    """The settings the config puts over the optimizer's defaults."""
    overrides = parse_optimizer_config(job.optimizer_config) if job.optimizer_config else {}
    if job.optimizer_beta1 is not None and job.optimizer_beta2 is not None:
        overrides["betas"] = (job.optimizer_beta1, job.optimizer_beta2)
    return overrides


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    overrides: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    params = list(params)
    if name not in DEFAULT_SETTINGS:
        raise ConfigError(f"optimizer: {name!r} is not supported")
    cls = _optimizer_class(name)
    settings = _accepted(name, cls, {"lr": lr, **DEFAULT_SETTINGS[name], **(overrides or {})})
    if name == "prodigy" and settings["lr"] < 0.1:
        log.warning(
            "optimizer prodigy: learning_rate %g scales the step size Prodigy finds; it is meant to be "
            "about 1.0 (set learning_rate 1.0 unless you mean to damp it)",
            settings["lr"],
        )
    try:
        return cls(params, **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"optimizer_config: {name} refused the settings {settings}: {exc}; fix the value in optimizer_config "
            "(or optimizer_beta1/optimizer_beta2)"
        ) from exc


def _optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    if name in ("adamw_bf16", "optimi-adamw"):
        import optimi

        return optimi.AdamW
    if name == "optimi-lion":
        import optimi

        return optimi.Lion
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    return _paged_lion8bit_class()


def _accepted(name: str, cls: Callable[..., Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Drop what the constructor does not take, with a warning, as SimpleTuner does."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return settings
    accepted = set(parameters)
    dropped = sorted(set(settings) - accepted)
    if dropped:
        log.warning(
            "optimizer_config: %s takes no %s; ignoring it (it accepts %s)",
            name,
            ", ".join(dropped),
            ", ".join(sorted(accepted - {"params"})),
        )
    return {key: value for key, value in settings.items() if key in accepted}


def _paged_lion8bit_class() -> Callable[..., torch.optim.Optimizer]:
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
    return bitsandbytes.optim.PagedLion8bit
