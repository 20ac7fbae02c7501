"""Flow matching as AuraFlow expects it: σ in (0, 1), the shift formula, auto-shift constants, per-step draws."""

import math

import pytest
import torch

from job.flow_matching import (
    auto_shift,
    draw_step,
    flow_loss,
    flow_target,
    noisy_latents,
    sample_sigmas,
    schedule_shift,
    shift_sigmas,
    step_generator,
)


def test_sigmas_are_logit_normal_inside_the_open_unit_interval():
    sigmas = sample_sigmas(20_000, step_generator(0, 0, 0))
    assert sigmas.shape == (20_000,)
    assert bool((sigmas > 0).all()) and bool((sigmas < 1).all())
    # sigmoid of N(0, 1): median 0.5, and logit(σ) is standard normal.
    logits = torch.logit(sigmas.double())
    assert abs(float(sigmas.median()) - 0.5) < 0.02
    assert abs(float(logits.std()) - 1.0) < 0.03


def test_shift_formula():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)
    # σ' = sσ / (1 + (s-1)σ): s=3 at σ=0.5 gives 0.75.
    assert torch.allclose(shift_sigmas(sigmas, 3.0), 3 * sigmas / (1 + 2 * sigmas))
    assert float(shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    shifted = shift_sigmas(sample_sigmas(1000, step_generator(1, 2, 0)), 3.0)
    assert bool((shifted > 0).all()) and bool((shifted < 1).all())


def test_auto_shift_uses_the_diffusers_constants():
    assert auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert auto_shift(2176) == pytest.approx(math.exp((0.5 + 1.15) / 2))
    # A 1024 px image: 128x128 latents, patch 2 → 4096 tokens.
    assert schedule_shift(None, True, (128, 128), 2) == pytest.approx(math.exp(1.15))


def test_auto_shift_wins_over_a_fixed_shift_and_zero_or_none_means_unshifted():
    """SimpleTuner: simpletuner/helpers/training/default_settings/safety_check.py ``safety_check`` zeroes
    flow_schedule_shift when flow_schedule_auto_shift is on; simpletuner/helpers/training/custom_schedule.py
    ``apply_flow_schedule_shift`` uses a fixed shift only above 0, else auto-shift, else none."""
    assert schedule_shift(3.0, True, (128, 128), 2) == pytest.approx(math.exp(1.15))
    assert schedule_shift(3.0, False, (128, 128), 2) == 3.0
    assert schedule_shift(0.0, False, (128, 128), 2) is None
    assert schedule_shift(None, False, (128, 128), 2) is None


def test_noisy_latents_and_target():
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.25, 1.0])
    xt = noisy_latents(x0, noise, sigmas)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * noise[0])
    assert torch.allclose(xt[1], noise[1])
    assert torch.equal(flow_target(x0, noise), noise - x0)


def test_loss_is_fp32_mse():
    prediction = torch.randn(2, 4, 8, 8).bfloat16()
    target = torch.randn(2, 4, 8, 8)
    loss = flow_loss(prediction, target)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(((prediction.float() - target) ** 2).mean()))


def test_step_draws_are_a_pure_function_of_seed_step_and_rank():
    shape = torch.Size([2, 4, 8, 8])
    a = draw_step(step_generator(42, 7, 0), shape, shift=None)
    b = draw_step(step_generator(42, 7, 0), shape, shift=None)
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.noise, b.noise)
    assert torch.equal(a.dropout_draws, b.dropout_draws)
    for other in (step_generator(42, 8, 0), step_generator(42, 7, 1), step_generator(43, 7, 0)):
        assert not torch.equal(draw_step(other, shape, shift=None).noise, a.noise)
    shifted = draw_step(step_generator(42, 7, 0), shape, shift=3.0)
    assert torch.allclose(shifted.sigmas, shift_sigmas(a.sigmas, 3.0))
