"""Where a job's caches live: one place that names every cache path in the work directory.

Relative ``cache_dir_vae`` (per dataset) and ``cache_dir`` (the text_embeds backend) are resolved inside
the work directory, never against the user's dataset folder, which is never written to.
"""

import re
from pathlib import Path

from job.config.backends import DatasetConfig, TextEmbedsConfig
from job.workdir import WorkDir


def safe_name(dataset_id: str) -> str:
    """``dataset_id`` as one file-name component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", dataset_id) or "_"


def latent_dir(workdir: WorkDir, dataset: DatasetConfig) -> Path:
    return workdir.resolve(dataset.cache_dir_vae, workdir.latents(safe_name(dataset.id)))


def text_dir(workdir: WorkDir, text_embeds: TextEmbedsConfig) -> Path:
    return workdir.resolve(text_embeds.cache_dir, workdir.text_cache)


def manifest_path(workdir: WorkDir, dataset_id: str) -> Path:
    """The dataset's training plan (samples, buckets, cache keys): what training reads."""
    return workdir.buckets / f"{safe_name(dataset_id)}.json"


def probe_path(workdir: WorkDir, dataset_id: str) -> Path:
    """What warm learnt about each file (hash, size), so an unchanged file is not read again."""
    return workdir.buckets / f"{safe_name(dataset_id)}.files.json"


def mask_probe_path(workdir: WorkDir, mask_id: str, dataset_id: str) -> Path:
    """What warm learnt about the masks of one dataset (a mask backend two datasets share has two)."""
    return workdir.buckets / f"{safe_name(mask_id)}.masks-of-{safe_name(dataset_id)}.json"


def report_path(workdir: WorkDir, dataset_id: str) -> Path:
    return workdir.cache / f"report-{safe_name(dataset_id)}.json"


def file_hashes_path(workdir: WorkDir) -> Path:
    return workdir.cache / "file-hashes.json"
