"""How long training runs and how the learning rate moves over it."""

from __future__ import annotations

import logging
import math

import torch

from job.config.schema import JobConfig

log = logging.getLogger("lokr")


def total_steps(job: JobConfig, batches_per_epoch: int) -> int:
    """Optimizer steps in the run: ``max_train_steps`` when above 0, else epochs' worth of batches.

    With ``strict_epoch_limit`` and both set, the run also stops at the end of epoch
    ``num_train_epochs``, whichever comes first (SimpleTuner's trainer.py, ``train``).
    """
    epoch_steps = math.ceil(job.num_train_epochs * batches_per_epoch / job.gradient_accumulation_steps)
    if job.max_train_steps == 0:
        return epoch_steps
    if job.strict_epoch_limit and job.num_train_epochs > 0:
        return min(job.max_train_steps, epoch_steps)
    return job.max_train_steps


def build_lr_scheduler(
    job: JobConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules by SimpleTuner's names; the schedule is one step per optimizer step.

    ``polynomial`` is SimpleTuner's (simpletuner/helpers/training/custom_schedule.py, ``get_lr_scheduler``
    and ``get_polynomial_decay_schedule_with_warmup``, the same formula as diffusers'): after the warm-up
    the rate falls from ``learning_rate`` to ``lr_end`` as (1 - progress) ** ``lr_power``, with
    SimpleTuner's defaults (4e-7 and 0.8) rather than diffusers' (1e-7 and 1.0).
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if job.lr_scheduler == "constant" and job.lr_warmup_steps:
        log.warning(
            "lr_scheduler constant ignores lr_warmup_steps=%d; use constant_with_warmup to warm up",
            job.lr_warmup_steps,
        )
    if job.lr_scheduler == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=job.lr_warmup_steps,
            num_training_steps=_span(job, steps),
            lr_end=job.lr_end,
            power=job.lr_power,
        )
    return get_scheduler(
        job.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=job.lr_warmup_steps,
        num_training_steps=_span(job, steps),
    )


def _span(job: JobConfig, steps: int) -> int:
    """The steps a schedule spans: the run's, except that SimpleTuner spans it over max_train_steps even
    where strict_epoch_limit stops the run sooner (its schedule is built apart from the epoch limit)."""
    return job.max_train_steps if job.strict_epoch_limit and job.max_train_steps else steps
