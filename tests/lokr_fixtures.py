"""Shared pieces of the LoKr tests: the seed's LyCORIS config, and an adapter file with random weights."""

from __future__ import annotations

from pathlib import Path

import json5
import torch

from job.config.schema import LycorisConfig
from job.model.lokr import attach_lokr, reset_lycoris_preset, save_adapter

# The user's file from the seed, verbatim (trailing commas and all): Attention modules, factor 8.
SEED_LYCORIS = LycorisConfig.model_validate(
    json5.loads((Path(__file__).parent / "fixtures" / "seed" / "config" / "lycoris_config.json").read_text())
)


def write_random_adapter(model: Path, lycoris: LycorisConfig, path: Path, *, std: float = 1.0) -> Path:
    """A LoKr file as training writes it, for ``model``'s transformer, with weights far enough from zero
    to change the images (normal, standard deviation ``std``)."""
    from diffusers import AuraFlowTransformer2DModel

    transformer = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    network = attach_lokr(transformer, lycoris, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    save_adapter(network, path, lycoris)
    reset_lycoris_preset()
    return path
