"""Validation images and the eval loss."""
