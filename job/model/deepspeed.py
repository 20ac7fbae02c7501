"""Full-rank training (``model_type: full``) sharded with DeepSpeed ZeRO stage 2 or 3, through accelerate.

The user's ``deepspeed_config`` (checked by ``job.config.deepspeed`` when the config loaded) goes to
accelerate's ``DeepSpeedPlugin(hf_ds_config=...)``, with what it leaves to ``"auto"`` filled from config.json.
DeepSpeed itself is the optional ``deepspeed`` extra: it is imported only to train, so ``check`` and most
tests run without it.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from job.config.deepspeed import AUTO, load_deepspeed_config
from job.config.schema import JobConfig
from job.errors import ConfigError

if TYPE_CHECKING:
    from accelerate.utils import DeepSpeedPlugin


def require_deepspeed() -> None:
    """``ConfigError`` unless DeepSpeed is importable (it is the optional ``deepspeed`` extra)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "deepspeed_config is set but DeepSpeed is not installed: install the deepspeed extra "
            "(pip install 'lokr-job[deepspeed]', on a machine with the CUDA toolkit for its kernels) or remove "
            "deepspeed_config"
        )


def deepspeed_plugin(job: JobConfig) -> DeepSpeedPlugin:
    """accelerate's plugin for ``job``'s validated DeepSpeed config (building it does not need DeepSpeed;
    ``Accelerator(deepspeed_plugin=...)`` does: call ``require_deepspeed`` first when training)."""
    from accelerate.utils import DeepSpeedPlugin

    settings = load_deepspeed_config(job)
    # Fill what the file leaves to "auto" from config.json: accelerate could only take the batch size from
    # a prepared torch DataLoader, and would default the clipping to 1.0.
    config = dict(settings.config)
    for key, value in (
        ("train_micro_batch_size_per_gpu", job.train_batch_size),
        ("gradient_accumulation_steps", job.gradient_accumulation_steps),
        ("gradient_clipping", job.max_grad_norm or 0.0),
    ):
        if config.get(key, AUTO) == AUTO:
            config[key] = value
    if settings.stage == 3:
        # The output is the whole transformer: ZeRO-3 must gather its shards for accelerate.get_state_dict.
        config["zero_optimization"] = {
            **config["zero_optimization"],
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    try:
        return DeepSpeedPlugin(hf_ds_config=config)
    except ValueError as exc:
        raise ConfigError(f"{settings.path}: accelerate rejects this DeepSpeed config: {exc}") from exc
