"""The training loop: loss, optimizers, schedules, EMA, checkpoints, preemption."""
