"""The LyCORIS LoKr adapter: attaching it to the transformer, and its file format.

``LycorisNetwork.apply_preset`` sets class attributes, i.e. process-global state: every attach starts
from LyCORIS's own defaults, so one run's preset never leaks into the next (tests included).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from job.config.schema import LycorisConfig
from job.errors import ConfigError

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

log = logging.getLogger("lokr")

# The metadata key SimpleTuner writes the LyCORIS config under (its _save_lycoris hook).
METADATA_KEY = "lycoris_config"

_PRESET_ATTRIBUTES = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "LORA_PREFIX",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)
_default_preset: dict[str, Any] | None = None


def reset_lycoris_preset() -> None:
    """Put LyCORIS's process-global preset back to the library defaults."""
    global _default_preset
    from lycoris import LycorisNetwork

    if _default_preset is None:
        # First call: nothing has applied a preset yet (only this module does), so these are the defaults.
        _default_preset = {name: copy.deepcopy(getattr(LycorisNetwork, name)) for name in _PRESET_ATTRIBUTES}
    for name, value in _default_preset.items():
        setattr(LycorisNetwork, name, copy.deepcopy(value))


def lycoris_settings(config: LycorisConfig) -> dict[str, Any]:
    """The config as the user wrote it (parsed): what goes into the adapter's metadata and lycoris_config.json."""
    return config.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def attach_lokr(transformer: torch.nn.Module, config: LycorisConfig, *, seed: int) -> LycorisNetwork:
    """Wrap the transformer's modules with LoKr and return the network (its parameters are the trainable ones).

    The transformer must already be cast, quantized and frozen. The initial weights are a function of ``seed``.
    With torchao-quantized weights the LoKr runs in bypass mode (its output added to the layer's, not its
    change to the layer's weight, which a quantized tensor cannot take): torchao keeps ``nn.Linear`` as the
    module, so LyCORIS does not switch to bypass itself as it does for quanto's and bitsandbytes' layers.
    """
    from lycoris import LycorisNetwork, create_lycoris

    route_lycoris_logs()
    reset_lycoris_preset()
    if config.apply_preset is not None:
        LycorisNetwork.apply_preset(config.apply_preset.model_dump(exclude_unset=True, exclude_none=True))
    extra = dict(config.model_extra or {})
    # LyCORIS initialises w1 (and the w2 factors) from the global RNG; fork it so the run's seed decides.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = create_lycoris(
            transformer,
            # SimpleTuner int()s the multiplier; 0.5 means 0.5 here.
            config.multiplier,
            linear_dim=config.linear_dim,
            linear_alpha=config.linear_alpha,
            algo=config.algo,
            factor=config.factor,
            **({"bypass_mode": True} if _has_wrapped_weights(transformer) else {}),
            **extra,
        )
    if not network.loras:
        raise ConfigError(
            "lycoris_config: the preset matched no module of the AuraFlow transformer; check "
            "apply_preset.target_module / target_name (the seed's example targets 'Attention')"
        )
    network.apply_to()
    parameters = sum(p.numel() for p in network.parameters())
    log.info("LoKr: %d modules wrapped, %s trainable parameters", len(network.loras), f"{parameters:,}")
    return network


def _has_wrapped_weights(transformer: torch.nn.Module) -> bool:
    """Whether a Linear weight is a tensor subclass (torchao's quantized tensors) rather than a plain one."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(
        is_traceable_wrapper_subclass(module.weight)
        for module in transformer.modules()
        if isinstance(module, torch.nn.Linear)
    )


def route_lycoris_logs() -> None:
    """LyCORIS prints colour-coded INFO lines to stdout through its own handler; send its warnings and
    errors through the job's logging instead (the summary line above says what its INFO lines said)."""
    lycoris_log = logging.getLogger("LyCORIS")
    for handler in list(lycoris_log.handlers):
        lycoris_log.removeHandler(handler)
    lycoris_log.setLevel(logging.WARNING)
    lycoris_log.propagate = True


def adapter_metadata(config: LycorisConfig) -> dict[str, str]:
    """safetensors metadata for an adapter file: the LyCORIS config, as SimpleTuner writes it."""
    return {METADATA_KEY: json.dumps(lycoris_settings(config), sort_keys=True)}


def adapter_state_dict(network: LycorisNetwork) -> dict[str, torch.Tensor]:
    """The network's tensors in LyCORIS's key format (what ``save_weights`` writes), detached, on the CPU."""
    return {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}


def save_adapter(network: LycorisNetwork, path: Path, config: LycorisConfig) -> None:
    """Write the adapter as ``LycorisNetwork.save_weights`` does, in the dtype it trains in.

    The bytes depend only on the weights and the config (no timestamps), so equal runs give equal files.
    """
    from safetensors.torch import save_file

    save_file(adapter_state_dict(network), str(path), metadata=adapter_metadata(config))


def merge_lokr(network: LycorisNetwork, multiplier: float) -> None:
    """Add each LoKr module's change to its base layer's weight, as the training forward computes it.

    That forward (``LokrModule._rebuild_forward``) adds ``multiplier · get_weight() · scalar``, where
    ``get_weight`` already holds the ``alpha / rank`` scale. LyCORIS's own ``merge_to`` goes through
    ``get_diff_weight``, which multiplies by that scale a second time (lycoris-lora 4.1.3): right only when
    alpha equals the rank, as with the seed's full-matrix LoKr, and off by the scale otherwise.
    """
    network.eval()  # no rank dropout in the change merged
    with torch.no_grad():
        for module in network.loras:
            weight = module.org_module[0].weight
            change = (module.get_weight(module.shape) * module.scalar).to(weight.dtype)
            if module.wd:
                merged = module.apply_weight_decompose(weight + change, multiplier)
            else:
                merged = weight + change * multiplier
            weight.copy_(merged)
