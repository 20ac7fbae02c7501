"""Structured logs (credentials masked by ``job.redact``), trackers (TensorBoard, wandb) and webhooks;
progress lines are ``job.progress``, which every stage and the storage transfers share.

Submodules are imported directly (``job.track.logs`` and friends); this package imports nothing, so the
CLI can set up logging without loading torch.
"""
