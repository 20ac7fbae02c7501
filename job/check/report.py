"""What ``lokr-job check`` found: the report its text and JSON forms are made from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from job.check.access import Access
from job.check.census import DatasetCensus
from job.check.disk import DiskEstimate
from job.check.estimate import CacheEstimate, VramEstimate
from job.errors import ExitCode

# A report's exit code is that of the problem ``run`` would meet first.
_EXIT_PRIORITY = (ExitCode.BAD_CONFIG, ExitCode.NO_PERMISSION, ExitCode.BAD_DATA, ExitCode.TRANSIENT)


@dataclass
class CheckReport:
    config_path: str
    recipe_hash: str
    model: str
    precision: str
    warnings: list[str]
    access: list[Access] = field(default_factory=list)
    datasets: list[DatasetCensus] = field(default_factory=list)
    batches_per_epoch: int = 0
    steps: int = 0
    epochs: float = 0.0
    cache: CacheEstimate | None = None
    vram: VramEstimate | None = None
    disk: DiskEstimate | None = None
    estimates_note: str | None = None  # why an estimate is rough (data not fetched yet)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (exit code, message)

    @property
    def exit_code(self) -> int:
        codes = {code for code, _ in self.problems}
        return next((int(c) for c in _EXIT_PRIORITY if int(c) in codes), int(ExitCode.OK))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "exit_code": self.exit_code,
            "config": self.config_path,
            "recipe_hash": self.recipe_hash,
            "model": self.model,
            "precision": self.precision,
            "warnings": self.warnings,
            "access": [
                {"what": a.what, "uri": a.uri, "ok": a.ok, "detail": a.detail, "exit_code": a.exit_code}
                for a in self.access
            ],
            "datasets": [d.as_dict() for d in self.datasets],
            "batches_per_epoch": self.batches_per_epoch,
            "steps": self.steps,
            "epochs": None if math.isinf(self.epochs) else round(self.epochs, 3),
            "cache": None
            if self.cache is None
            else {
                "latent_bytes": self.cache.latent_bytes,
                "text_bytes": self.cache.text_bytes,
                "total_bytes": self.cache.total_bytes,
                "latents": self.cache.latents,
                "texts": self.cache.texts,
            },
            "vram": None if self.vram is None else self.vram.as_dict(),
            "disk": None if self.disk is None else self.disk.as_dict(),
            "estimates_note": self.estimates_note,
            "problems": [{"exit_code": code, "message": message} for code, message in self.problems],
        }
