"""A stable evaluation loss: the flow-matching loss at fixed noise levels with fixed noise.

Training loss jumps with the random σ and ε of each step; holding both fixed makes successive
evaluations of the same held-out batches comparable, so a falling eval loss means the model improved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


class EvalBatch(Protocol):
    latents: torch.Tensor  # (B, C, H, W), already multiplied by the VAE's scaling factor
    prompt_embeds: torch.Tensor  # (B, L, D)
    prompt_mask: torch.Tensor | None  # (B, L), 1 for real tokens
    loss_mask: torch.Tensor | None  # (B, 1, H, W) loss weights (masked loss), or None


def eval_loss(
    transformer: torch.nn.Module,
    batches: Iterable[EvalBatch],
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean per-sample MSE (fp32) of ``transformer``'s ``ε - x0`` prediction over batches × sigmas, each
    element weighted by the batch's loss mask when it has one (as the training loss is).

    ``x_t = (1-σ)·x0 + σ·ε`` with ε drawn on the CPU from one generator seeded with ``seed``, so the
    result is the same on every device for the same batches in the same order. The transformer gets
    ``timestep=σ`` in [0, 1] (it scales by 1000 itself). ``device``/``dtype`` default to the
    transformer's; pass the onload device when it is group-offloaded.
    """
    import torch

    # The same x_t and target as the training loss: an eval loss must measure what training optimises.
    from job.flow_matching import flow_target, noisy_latents

    first = next(transformer.parameters())
    device = torch.device(device) if device is not None else first.device
    dtype = dtype or getattr(transformer, "dtype", None) or first.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    total, count = 0.0, 0
    was_training = transformer.training
    transformer.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x0 = batch.latents.detach().to("cpu", torch.float32)
                embeds = _masked(batch.prompt_embeds, batch.prompt_mask).to(device, dtype)
                for sigma in sigmas:
                    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
                    sigma_batch = torch.full((x0.shape[0],), sigma, dtype=torch.float32)
                    noisy = noisy_latents(x0, noise, sigma_batch)
                    timestep = sigma_batch.to(device, dtype)
                    prediction = transformer(
                        hidden_states=noisy.to(device, dtype),
                        encoder_hidden_states=embeds,
                        timestep=timestep,
                        return_dict=False,
                    )[0]
                    target = flow_target(x0, noise).to(device)
                    squared = (prediction.float() - target).pow(2)
                    if batch.loss_mask is not None:
                        squared = squared * batch.loss_mask.to(device, torch.float32)
                    per_sample = squared.flatten(1).mean(dim=1)
                    total += per_sample.sum().item()
                    count += per_sample.numel()
    finally:
        transformer.train(was_training)
    if count == 0:
        raise ValueError("eval_loss needs at least one batch and one sigma")
    return total / count


def _masked(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padding positions, as AuraFlowPipeline.encode_prompt does (idempotent on cached embeds)."""
    if mask is None:
        return embeds
    if mask.dim() == embeds.dim() - 1:
        mask = mask.unsqueeze(-1)
    return embeds * mask.to(embeds.dtype)
