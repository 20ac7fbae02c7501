"""Finding a dataset's images: a recursive walk of the folder, with each file's size and mtime.

Size and mtime come for free with the walk (``os.scandir``) and let the scan reuse what it learnt about an
unchanged file last time instead of reading it again. SimpleTuner's ``skip_file_discovery`` (config.json,
or a dataset's block) names the stages to trust from the last run instead of looking again: ``aspect`` and
``metadata`` take the last scan's file list and sizes instead of walking the folder (new, changed and
removed files go unnoticed); ``vae`` and ``text`` leave the dataset's latents and caption embeddings
unencoded by warm (training then needs them all cached already).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from job.config.backends import DatasetConfig, discovery_skips
from job.config.schema import JobConfig

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


@dataclass(frozen=True)
class FoundImage:
    relpath: str  # POSIX, relative to the dataset root: the image's name in reports and caches
    size: int
    mtime_ns: int


def find_images(root: Path) -> list[FoundImage]:
    """Every image file under ``root``, sorted by relative path.

    Hidden files and folders (``.DS_Store``, macOS ``._photo.jpg`` forks, ``.cache``) are not data.
    Symlinked folders are followed once: a link back up the tree does not loop.
    """
    found: list[FoundImage] = []
    seen_dirs: set[tuple[int, int]] = set()
    pending = [(Path(root), "")]
    while pending:
        folder, prefix = pending.pop()
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                relpath = f"{prefix}{entry.name}"
                if entry.is_dir():
                    pending.append((Path(entry.path), f"{relpath}/"))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    info = entry.stat()
                    found.append(FoundImage(relpath, info.st_size, info.st_mtime_ns))
    found.sort(key=lambda image: image.relpath)
    return found


def skipped_stages(job: JobConfig, dataset: DatasetConfig) -> frozenset[str]:
    """The discovery stages skipped for ``dataset``: SimpleTuner skips a stage named in either place."""
    return discovery_skips(job.skip_file_discovery) | discovery_skips(dataset.skip_file_discovery)


def trusts_last_scan(job: JobConfig, dataset: DatasetConfig) -> bool:
    return bool(skipped_stages(job, dataset) & {"aspect", "metadata"})


def encodes_on_demand(job: JobConfig, dataset: DatasetConfig) -> bool:
    """Whether training encodes ``dataset``'s latents (``vae_cache_ondemand``, config.json's or its own)
    instead of warm."""
    return job.vae_cache_ondemand or dataset.vae_cache_ondemand
