"""Eval loss: the flow-matching formula at fixed sigmas and noise, deterministic, σ in [0, 1]."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from job.validate.eval_loss import DEFAULT_SIGMAS, eval_loss


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None
    loss_mask: torch.Tensor | None = None


class Recorder(torch.nn.Module):
    """Predicts ``scale * x_t`` and remembers every timestep and text embedding it was given."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.timesteps: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=True):  # type: ignore[no-untyped-def]
        self.timesteps.append(timestep)
        self.embeds.append(encoder_hidden_states)
        return (self.scale * hidden_states,)


def _batches(n: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return [
        Batch(torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 32, generator=generator), mask)
        for _ in range(n)
    ]


def test_matches_the_formula_with_noise_from_the_seed() -> None:
    batches = _batches()
    model = Recorder(0.5)
    generator = torch.Generator().manual_seed(123)
    losses = []
    for batch in batches:
        for sigma in DEFAULT_SIGMAS:
            noise = torch.randn(batch.latents.shape, generator=generator)
            noisy = (1 - sigma) * batch.latents + sigma * noise
            per_sample = ((0.5 * noisy - (noise - batch.latents)) ** 2).flatten(1).mean(1)
            losses += per_sample.tolist()
    expected = sum(losses) / len(losses)
    assert eval_loss(model, batches, seed=123) == pytest.approx(expected, rel=1e-6)
    # σ goes in as given, in [0, 1], one per sample.
    torch.testing.assert_close(torch.stack(model.timesteps[:2]), torch.tensor([[0.1, 0.1], [0.3, 0.3]]))
    # Padding positions reach the transformer zeroed, as the pipeline's encode_prompt leaves them.
    assert torch.all(model.embeds[0][0, 3] == 0) and torch.all(model.embeds[0][1, 2:] == 0)


def test_deterministic_and_seed_dependent() -> None:
    batches = _batches()
    model = Recorder(0.9)
    first = eval_loss(model, batches, seed=1)
    assert eval_loss(model, batches, seed=1) == first
    assert eval_loss(model, batches, seed=2) != first
    assert eval_loss(model, batches, sigmas=(0.5,), seed=1) != first


def test_does_not_touch_gradients_or_training_mode() -> None:
    model = Recorder(0.9).train()
    eval_loss(model, _batches(1), seed=0)
    assert model.training and model.scale.grad is None


def test_no_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        eval_loss(Recorder(1.0), [], seed=0)


def test_runs_on_the_tiny_auraflow_transformer(tiny_job: Path) -> None:
    from diffusers import AuraFlowTransformer2DModel

    transformer = AuraFlowTransformer2DModel.from_pretrained(
        tiny_job.parent.parent / "model", subfolder="transformer"
    )
    batches = _batches()
    loss = eval_loss(transformer, batches, seed=5)
    assert loss > 0 and loss == eval_loss(transformer, batches, seed=5)


def test_a_loss_mask_weights_the_eval_loss_as_it_weights_training() -> None:
    batches = _batches(1)
    plain = eval_loss(Recorder(0.5), batches, seed=3)
    weights = torch.zeros(2, 1, 8, 8)
    weights[..., :4] = 1.0
    batches[0].loss_mask = weights
    masked = eval_loss(Recorder(0.5), batches, seed=3)
    assert 0 < masked < plain
    batches[0].loss_mask = torch.ones(2, 1, 8, 8)
    assert eval_loss(Recorder(0.5), batches, seed=3) == pytest.approx(plain)
