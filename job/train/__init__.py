"""The training loop and its two trainers (LoKr, full-rank): loss, optimizers, schedules, EMA, checkpoints."""
