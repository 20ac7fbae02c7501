"""Logging, progress, trackers, webhooks and status.json."""
