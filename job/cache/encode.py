"""The two encoders the caches hold the output of, as the AuraFlow pipeline runs them.

Latents: ``vae.encode(x).latent_dist.sample() * scaling_factor`` (AuraFlow has no shift factor), each
sample drawn from its own generator seeded by the entry's key, so a latent does not depend on which batch
it was encoded in. Text: ``AuraFlowPipeline.encode_prompt``: pad to ``max_length``, truncate, run the
encoder with the attention mask, and zero the embeddings of the padding (the mask multiply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] float32 tensor in [-1, 1], what the VAE expects."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div_(127.5).sub_(1.0)


def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, noise_seeds: list[int]) -> torch.Tensor:
    """[B, 3, H, W] pixels → [B, C, H/8, W/8] float32 latents on the CPU."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in noise_seeds]
    with torch.inference_mode():
        distribution = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = distribution.sample(generator=generators) * vae.config.scaling_factor
    return latents.float().cpu()


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, encoder: UMT5EncoderModel, captions: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings [B, L, D] (the encoder's dtype, padding zeroed) and attention masks [B, L] int64."""
    inputs = tokenizer(
        captions, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    with torch.inference_mode():
        embeds = encoder(
            input_ids=inputs["input_ids"].to(encoder.device),
            attention_mask=inputs["attention_mask"].to(encoder.device),
        )[0]
        mask = inputs["attention_mask"].to(encoder.device)
        embeds = (embeds * mask.unsqueeze(-1).expand(embeds.shape)).to(encoder.dtype)
    return embeds.cpu(), mask.cpu().to(torch.int64)


def count_truncated(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int) -> int:
    """How many captions are longer than ``max_length`` tokens (their tails are not trained on)."""
    lengths = tokenizer(captions, truncation=False, padding=False)["input_ids"]
    return sum(len(ids) > max_length for ids in lengths)
