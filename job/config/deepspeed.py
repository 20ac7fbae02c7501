"""``deepspeed_config``: the DeepSpeed ZeRO-2/3 JSON that full-rank training (``model_type: full``) runs with.

Checked when the config set loads, so what DeepSpeed or accelerate would reject at ``prepare()`` time
(minutes into a run, as a stack trace) is a ``ConfigError`` up front that names the file and the key.
``job.model.deepspeed`` hands the checked file to accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json5

from job.config.schema import JobConfig
from job.errors import ConfigError

ZERO_STAGES = (2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
AUTO = "auto"


@dataclass(frozen=True)
class DeepSpeedSettings:
    """A validated DeepSpeed config and what it asks for."""

    path: Path
    config: dict[str, Any]
    stage: int
    offload_optimizer: str
    offload_param: str


def load_deepspeed_config(job: JobConfig) -> DeepSpeedSettings:
    """Read and check ``job.deepspeed_config``; ``ConfigError`` lists every problem, each with file and key."""
    if not job.deepspeed_config:
        raise ConfigError(
            "deepspeed_config is not set: model_type full trains with DeepSpeed ZeRO stage 2 or 3"
        )
    path = Path(job.deepspeed_config)
    try:
        config = json5.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: deepspeed_config cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold an object {{...}}, found {type(config).__name__}")
    problems = [f"{path}: {problem}" for problem in deepspeed_problems(config, job)]
    if problems:
        raise ConfigError(problems)
    zero = config["zero_optimization"]
    return DeepSpeedSettings(
        path=path,
        config=config,
        stage=zero["stage"],
        offload_optimizer=_offload_device(zero, "offload_optimizer"),
        offload_param=_offload_device(zero, "offload_param"),
    )


def deepspeed_problems(config: dict[str, Any], job: JobConfig) -> list[str]:
    """Everything in ``config`` that cannot train ``job``, as ``key: what to do`` lines."""
    problems = []
    if job.model_type != "full":
        problems.append(
            "deepspeed_config is for model_type full; a LoKr adapter (model_type lora) trains without it "
            "(use enable_group_offload to save VRAM)"
        )
    if job.enable_group_offload:
        problems.append(
            "deepspeed_config and enable_group_offload cannot be combined: ZeRO shards the weights"
        )
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        problems.append("zero_optimization: missing; set zero_optimization.stage to 2 or 3")
        return problems
    stage = zero.get("stage")
    if stage not in ZERO_STAGES:
        problems.append(f"zero_optimization.stage: {stage!r}; lokr-job trains with ZeRO stage 2 or 3")
    for section in ("offload_optimizer", "offload_param"):
        problems += _offload_problems(zero, section)
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is False:
        problems.append(
            "zero_optimization.stage3_gather_16bit_weights_on_model_save: false, but the trained transformer "
            "is written whole at the end; set it to true or remove it"
        )
    if stage == 3 and job.rolls_out:
        problems.append(
            "zero_optimization.stage: 3 cannot train with scheduled sampling (config.json's "
            "scheduled_sampling_max_step_offset): each GPU rolls out its own samples, a different number of "
            "forward passes, and ZeRO-3 gathers the weights across GPUs in every one; use stage 2, or set "
            "scheduled_sampling_max_step_offset to 0"
        )
    if stage == 2 and _offload_device(zero, "offload_param") != "none":
        problems.append(
            "zero_optimization.offload_param: parameters are offloaded only by ZeRO stage 3; "
            "set zero_optimization.stage to 3 or remove offload_param"
        )
    offloads_optimizer = _offload_device(zero, "offload_optimizer") in ("cpu", "nvme")
    if offloads_optimizer and config.get("zero_force_ds_cpu_optimizer") is not False:
        # lokr-job builds its own optimizer (config.json's optimizer); DeepSpeed refuses a client optimizer
        # with ZeRO-Offload unless told this is intended.
        problems.append(
            "zero_force_ds_cpu_optimizer: set it to false with offload_optimizer: the optimizer is config.json's "
            f"{job.optimizer!r}, stepped on the CPU, which DeepSpeed otherwise refuses"
        )
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(
                f"{section}: remove it; lokr-job builds the {section} from config.json "
                "(optimizer, learning_rate, lr_scheduler, lr_warmup_steps)"
            )
    problems += _matches_job(config, job)
    return problems


def _matches_job(config: dict[str, Any], job: JobConfig) -> list[str]:
    """Values DeepSpeed would otherwise take from the config file and accelerate would find mismatched."""
    problems = []
    expected = {
        "train_micro_batch_size_per_gpu": job.train_batch_size,
        "gradient_accumulation_steps": job.gradient_accumulation_steps,
    }
    for key, value in expected.items():
        if key in config and config[key] != AUTO and config[key] != value:
            config_key = "train_batch_size" if key.startswith("train_") else key
            problems.append(f'{key}: {config[key]!r} but config.json\'s {config_key} is {value}; use "auto"')
    if "gradient_clipping" in config and config["gradient_clipping"] != AUTO:
        problems.append('gradient_clipping: use "auto"; it comes from config.json\'s max_grad_norm')
    if job.grad_clip_method == "value" and job.max_grad_norm:
        problems.append(
            "DeepSpeed clips gradients by norm only: set grad_clip_method to norm in config.json "
            "(or max_grad_norm to 0 for no clipping)"
        )
    wanted = "bf16" if job.mixed_precision == "bf16" else None
    for dtype in ("fp16", "bf16"):
        section = config.get(dtype)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if str(enabled).lower() == "true" and dtype != wanted:
            problems.append(
                f"{dtype}.enabled: true, but config.json's mixed_precision is {job.mixed_precision!r}; "
                f'set it to "auto" (AuraFlow trains in bf16)'
            )
    return problems


def _offload_device(zero: dict[str, Any], section: str) -> str:
    offload = zero.get(section)
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    return str(device).lower()


def _offload_problems(zero: dict[str, Any], section: str) -> list[str]:
    offload = zero.get(section)
    if offload is None:
        return []
    key = f"zero_optimization.{section}"
    if not isinstance(offload, dict):
        return [f'{key}: must be an object such as {{"device": "cpu", "pin_memory": true}}']
    problems = []
    device = _offload_device(zero, section)
    if device not in OFFLOAD_DEVICES:
        problems.append(f"{key}.device: {offload.get('device')!r}; use one of {', '.join(OFFLOAD_DEVICES)}")
    if device == "nvme" and not offload.get("nvme_path"):
        problems.append(f"{key}.nvme_path: required with device nvme (a folder on a local NVMe drive)")
    if "pin_memory" in offload and not isinstance(offload["pin_memory"], bool):
        problems.append(f"{key}.pin_memory: {offload['pin_memory']!r}; use true or false")
    return problems
