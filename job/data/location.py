"""Where a dataset's images are on this machine: the one mapping from a dataset's config to a folder."""

from pathlib import Path

from job.config.backends import DatasetConfig
from job.config.paths import is_remote
from job.errors import ConfigError
from job.workdir import WorkDir


def is_fetched(dataset: DatasetConfig) -> bool:
    """True when ``lokr-job fetch`` copies the dataset into the work directory (S3 or the Hub)."""
    return dataset.type != "local" or is_remote(dataset.instance_data_dir or "")


def local_data_dir(dataset: DatasetConfig, workdir: WorkDir) -> Path:
    """The folder holding ``dataset``'s images: its own ``instance_data_dir`` when that is local, else
    ``<workdir>/data/<id>/``, where ``lokr-job fetch`` mirrors it. Pure: nothing is checked on disk."""
    if not is_fetched(dataset):
        return Path(dataset.instance_data_dir or "")
    if dataset.id in (".", "..") or "/" in dataset.id or "\\" in dataset.id:
        raise ConfigError(
            f"dataset id {dataset.id!r} cannot name a folder: use letters, digits, '-', '_' and '.'"
        )
    return workdir.dataset(dataset.id)
