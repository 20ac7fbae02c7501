"""What a warm did, for people (a log summary) and for tools and tests (counts and a JSON report).

The per-dataset report, ``<workdir>/cache/report-<dataset>.json``, lists every skipped file with its
path and reason, every dropped bucket and every encoding failure: the bad-data report.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from job.data.scan import Skipped
from job.files import write_json_atomic

log = logging.getLogger("lokr")

_LOGGED_PER_LIST = 5


@dataclass
class DatasetWarmReport:
    dataset_id: str
    root: str
    images_found: int = 0
    probed: int = 0  # files read this time: new or changed since the last warm
    usable_images: int = 0  # in buckets big enough for a step, each counted once (before repeats)
    skipped: list[Skipped] = field(default_factory=list)  # bad data: unreadable, too small, no caption
    dropped: list[str] = field(default_factory=list)  # one line per bucket too small for a step
    dropped_images: int = 0
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" → images, usable buckets only
    latents_cached: int = 0
    latents_new: int = 0
    failed: list[Skipped] = field(default_factory=list)  # images that could not be encoded
    masks_cached: int | None = None  # None: the dataset's loss is not masked
    masks_new: int = 0

    def write(self, path: Path) -> None:
        write_json_atomic(
            path,
            {
                "dataset": self.dataset_id,
                "root": self.root,
                "images_found": self.images_found,
                "probed": self.probed,
                "usable_images": self.usable_images,
                "buckets": self.buckets,
                "latents": {
                    "cached": self.latents_cached,
                    "new": self.latents_new,
                    "failed": len(self.failed),
                },
                **(
                    {}
                    if self.masks_cached is None
                    else {"masks": {"cached": self.masks_cached, "new": self.masks_new}}
                ),
                "skipped": [{"path": s.relpath, "reason": s.reason} for s in self.skipped],
                "dropped_buckets": self.dropped,
                "failed": [{"path": s.relpath, "reason": s.reason} for s in self.failed],
            },
        )

    def log_summary(self, report_path: Path) -> None:
        log.info(
            "warm: dataset %r: %d images found, %d usable in %d buckets, %d skipped, %d in dropped buckets; "
            "latents: %d cached, %d new, %d failed",
            self.dataset_id,
            self.images_found,
            self.usable_images,
            len(self.buckets),
            len(self.skipped),
            self.dropped_images,
            self.latents_cached,
            self.latents_new,
            len(self.failed),
        )
        if self.masks_cached is not None:
            log.info(
                "warm: dataset %r: loss masks: %d cached, %d new",
                self.dataset_id,
                self.masks_cached,
                self.masks_new,
            )
        for line in self.dropped:
            log.warning("warm: %s", line)
        for title, items in (("skipped", self.skipped), ("failed", self.failed)):
            for item in items[:_LOGGED_PER_LIST]:
                log.warning("warm: dataset %r: %s %s: %s", self.dataset_id, title, item.relpath, item.reason)
            if len(items) > _LOGGED_PER_LIST:
                log.warning(
                    "warm: dataset %r: %d more %s files; all are listed in %s",
                    self.dataset_id,
                    len(items) - _LOGGED_PER_LIST,
                    title,
                    report_path,
                )


@dataclass
class WarmReport:
    datasets: list[DatasetWarmReport]
    text_cached: int = 0
    text_new: int = 0
    text_truncated: int = 0  # newly encoded captions longer than max_token_length
    vae_loaded: bool = False
    text_encoder_loaded: bool = False
    adopted: int = 0  # entries found on disk, not in an index: latents training encoded on demand
    indexed: int = 0  # entries the caches' indexes gained: encoded, or adopted from disk

    @property
    def changed(self) -> bool:
        """Whether the caches hold something the last upload of their shards may lack."""
        return self.indexed > 0

    @property
    def latents_new(self) -> int:
        return sum(d.latents_new for d in self.datasets)

    @property
    def encoded(self) -> int:
        """Entries encoded by this warm (0 when everything was cached)."""
        return self.latents_new + self.text_new


def skip_summary(skipped: list[Skipped]) -> str:
    """The commonest reasons, for an error message: 'empty file (0 bytes) ×3; ...'."""
    kinds = Counter(s.reason.split(":")[0] for s in skipped)
    return "; ".join(f"{kind} ×{count}" for kind, count in kinds.most_common(4))
