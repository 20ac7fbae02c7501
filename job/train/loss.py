"""The training loss for flow matching, by ``loss_type``, as SimpleTuner computes it for AuraFlow.

SimpleTuner (simpletuner/helpers/models/common.py: ``loss``, ``conditional_loss``,
``compute_scheduled_huber_c``) offers three losses for flow-matching models, all in fp32:

- ``l2``: mean squared error;
- ``huber``: 2c·(√(d² + c²) − c), quadratic near 0 and linear (slope 2c) far out;
- ``smooth_l1``: 2·(√(d² + c²) − c), the same curve divided by c.

c is ``huber_c`` scheduled per sample by ``huber_schedule`` from the sample's timestep t = 1000·σ
(σ after the shift): ``constant`` keeps c; ``exponential`` is exp(ln(c)·t/1000) = c^σ;
``snr`` is (1 − c)/(1 + s)² + c with s = √((1 − σ)/(σ + 1e-4)), so noisier samples get a larger c.
Each sample's loss is its elementwise mean; the batch loss is the mean of those.

A loss mask (SimpleTuner's ``conditioning_type: mask``, job.cache.masks) multiplies the elementwise loss
before those means, as SimpleTuner does: a dark (0) latent position adds nothing, a white (1) one counts in
full, and the mean still divides by every position (it is not renormalised by the mask's area).

ReflexFlow (with scheduled sampling, job.train.rollout; SimpleTuner's ``loss`` in models/common.py), on
the elementwise loss before the mask: frequency compensation weights each element by
1 + α·e/Σ|e|, e the sample's exposure (the model's prediction at the clean input minus its prediction at the
rolled-out one, zero for a sample not rolled out), so what the rollout loses counts more; β2 scales the
whole loss; and anti-drift rectification adds β1·‖p/‖p‖ − d/‖d‖‖² per sample, the prediction's direction
against the input's (the model's input minus the clean latent, along ε − x0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from job.flow_matching import flow_loss

LossType = Literal["l2", "huber", "smooth_l1"]
HuberSchedule = Literal["snr", "exponential", "constant"]


@dataclass(frozen=True)
class ReflexFlow:
    """ReflexFlow's terms for one micro-batch."""

    alpha: float  # scheduled_sampling_reflexflow_alpha: frequency compensation
    beta1: float  # scheduled_sampling_reflexflow_beta1: anti-drift rectification
    beta2: float  # scheduled_sampling_reflexflow_beta2: the loss's scale
    drift: torch.Tensor  # the model's input minus the clean latents, like the prediction
    # The clean minus the rolled-out prediction, like the prediction; None: nothing rolled out.
    exposure: torch.Tensor | None = None


def huber_c_per_sample(sigmas: torch.Tensor, huber_c: float, schedule: HuberSchedule) -> torch.Tensor:
    """The c each sample's Huber loss uses, shape [B], fp32."""
    sigmas = sigmas.float()
    if schedule == "constant":
        return torch.full_like(sigmas, huber_c)
    if schedule == "exponential":
        return torch.pow(torch.tensor(huber_c, dtype=torch.float32, device=sigmas.device), sigmas)
    s = ((1.0 - sigmas) / (sigmas + 1e-4)).sqrt()
    return (1 - huber_c) / (1 + s) ** 2 + huber_c


def training_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    loss_type: LossType,
    huber_c: float,
    huber_schedule: HuberSchedule,
    mask: torch.Tensor | None = None,
    reflexflow: ReflexFlow | None = None,
) -> torch.Tensor:
    """The scalar loss of one micro-batch (``sigmas``: each sample's σ, shape [B]; ``mask``: [B, 1, h, w]
    weights in [0, 1] over the latent's positions, or None)."""
    if loss_type == "l2":
        if mask is None and reflexflow is None:
            # Every sample has as many elements, so the mean of per-sample means is the plain mean.
            return flow_loss(prediction, target)
        elementwise = (prediction.float() - target.float()) ** 2
    else:
        c = huber_c_per_sample(sigmas, huber_c, huber_schedule).to(prediction.device)
        c = c.view(-1, *([1] * (prediction.ndim - 1)))
        curve = torch.sqrt((prediction.float() - target.float()) ** 2 + c**2) - c
        elementwise = 2 * c * curve if loss_type == "huber" else 2 * curve
    if reflexflow is not None:
        elementwise = _compensated(elementwise, reflexflow)
    if mask is not None:
        elementwise = elementwise * mask.float()
    per_sample = elementwise.mean(dim=list(range(1, elementwise.ndim)))
    if reflexflow is not None and reflexflow.beta1 != 0:
        per_sample = per_sample + reflexflow.beta1 * _misdirection(prediction, reflexflow.drift)
    return per_sample.mean()


def _compensated(elementwise: torch.Tensor, terms: ReflexFlow) -> torch.Tensor:
    """The elementwise loss weighted by the exposure (frequency compensation) and scaled by β2."""
    if terms.exposure is not None and terms.alpha != 0:
        exposure = terms.exposure.detach().float()
        total = exposure.abs().sum(dim=list(range(1, exposure.ndim)), keepdim=True).clamp_min(1e-6)
        elementwise = elementwise * (1 + terms.alpha * exposure / total)
    return elementwise * terms.beta2


def _misdirection(prediction: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
    """Per sample, the squared distance between the unit directions of the prediction and the drift."""
    predicted = prediction.float().flatten(1)
    wanted = drift.float().flatten(1)
    predicted = predicted / predicted.norm(dim=1, keepdim=True).clamp_min(1e-6)
    wanted = wanted / wanted.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return (predicted - wanted).pow(2).sum(dim=1)
