"""Structured logs with secret redaction, progress reporting, trackers (TensorBoard, wandb) and webhooks.

Submodules are imported directly (``job.track.logs`` and friends); this package imports nothing, so the
CLI can set up logging without loading torch.
"""
