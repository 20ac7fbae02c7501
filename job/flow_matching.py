"""Flow matching as AuraFlow was trained with it (DESIGN §4), and the randomness of one training step.

x_t = (1-σ)·x0 + σ·ε, the model predicts ε - x0, and it is given ``timestep=σ`` in [0, 1]: its time
embedding multiplies by 1000 itself (passing σ·1000 is the bug that once degraded SimpleTuner's AuraFlow).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

# diffusers' FlowMatchEulerDiscreteScheduler / Flux defaults, which SimpleTuner's auto-shift uses.
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, rank): resuming needs no RNG replay."""
    digest = hashlib.blake2b(f"lokr-step:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_sigmas(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """σ from a logit-normal(0, 1): sigmoid of a standard normal, in (0, 1)."""
    return torch.sigmoid(torch.randn(batch_size, generator=generator))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s-1)σ): s > 1 moves training towards the noisier end."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def auto_shift(image_seq_len: int) -> float:
    """s = exp(μ), μ linear in the image's token count (0.5 at 256 tokens, 1.15 at 4096)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    mu = BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)
    return math.exp(mu)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int) -> int:
    return (latent_height // patch_size) * (latent_width // patch_size)


def schedule_shift(
    fixed_shift: float | None, auto: bool, latent_hw: tuple[int, int], patch_size: int
) -> float | None:
    """The shift for a batch, or None for unshifted σ, with SimpleTuner's precedence: auto-shift wins (its
    safety check zeroes a fixed shift set beside it), else a fixed shift above 0; 0 or None is no shift."""
    if auto:
        return auto_shift(image_seq_len(*latent_hw, patch_size))
    if fixed_shift:
        return fixed_shift
    return None


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigma = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: ε - x0."""
    return noise - latents


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in fp32 whatever the model ran in."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


@dataclass(frozen=True)
class StepDraws:
    """Everything random about one micro-batch, drawn in a fixed order from the step's generator."""

    sigmas: torch.Tensor  # [B] in (0, 1), shifted
    noise: torch.Tensor  # like the latents
    dropout_draws: torch.Tensor  # [B] uniform; a caption is dropped where draw < its probability


def draw_step(
    generator: torch.Generator,
    latents_shape: torch.Size,
    *,
    shift: float | None,
) -> StepDraws:
    batch_size = latents_shape[0]
    sigmas = sample_sigmas(batch_size, generator)
    if shift is not None:
        sigmas = shift_sigmas(sigmas, shift)
    noise = torch.randn(latents_shape, generator=generator)
    dropout_draws = torch.rand(batch_size, generator=generator)
    return StepDraws(sigmas=sigmas, noise=noise, dropout_draws=dropout_draws)
