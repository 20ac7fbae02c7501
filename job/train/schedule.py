"""How long training runs and how the learning rate moves over it."""

from __future__ import annotations

import logging
import math

import torch

from job.config.schema import JobConfig

log = logging.getLogger("lokr")


def total_steps(job: JobConfig, batches_per_epoch: int) -> int:
    """Optimizer steps in the run: ``max_train_steps`` when above 0, else epochs' worth of batches."""
    if job.max_train_steps > 0:
        return job.max_train_steps
    return math.ceil(job.num_train_epochs * batches_per_epoch / job.gradient_accumulation_steps)


def build_lr_scheduler(
    job: JobConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules by SimpleTuner's names; the schedule is one step per optimizer step."""
    from diffusers.optimization import get_scheduler

    if job.lr_scheduler == "constant" and job.lr_warmup_steps:
        log.warning(
            "lr_scheduler constant ignores lr_warmup_steps=%d; use constant_with_warmup to warm up",
            job.lr_warmup_steps,
        )
    return get_scheduler(
        job.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=job.lr_warmup_steps,
        num_training_steps=steps,
    )
