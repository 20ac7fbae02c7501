"""Validation during training: the prompts, the images, and a deterministic eval loss."""
