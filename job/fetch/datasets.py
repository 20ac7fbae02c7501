"""Datasets on S3 or the Hub mirrored into ``<workdir>/data/<id>/`` (``job.data.location`` says where).

A dataset is remote when its ``instance_data_dir`` is a URI, or it is SimpleTuner's ``type: aws``
(``aws_bucket_name``, ``aws_data_prefix``, ``aws_endpoint_url``, ``aws_region_name``; keys from boto3's
chain) or ``type: huggingface`` (``job.fetch.hub_dataset``). Mirroring is incremental (the storage
layer's manifest): a second fetch moves no object bytes, a changed object is fetched again.
"""

from __future__ import annotations

from job.config.schema import DatasetConfig
from job.data.location import is_fetched, local_data_dir
from job.errors import ConfigError
from job.fetch.hub_dataset import fetch_hub_dataset
from job.storage import TransferReport, storage_for
from job.workdir import WorkDir


def dataset_uri(dataset: DatasetConfig) -> str:
    """Where a remote dataset lives: its ``instance_data_dir`` URI, or the ``type: aws`` bucket and prefix."""
    if dataset.type == "aws":
        prefix = dataset.aws_data_prefix.strip("/")
        return f"s3://{dataset.aws_bucket_name}/{prefix}" if prefix else f"s3://{dataset.aws_bucket_name}"
    return dataset.instance_data_dir or ""


def fetch_dataset(
    dataset: DatasetConfig, workdir: WorkDir, *, progress: bool = True
) -> TransferReport | None:
    """Mirror ``dataset`` into the work directory; None for a local dataset (nothing to fetch)."""
    if not is_fetched(dataset):
        return None
    dest = local_data_dir(dataset, workdir)
    if dataset.type == "huggingface":
        return fetch_hub_dataset(dataset, dest, progress=progress)
    uri = dataset_uri(dataset)
    options = {}
    if uri.startswith("s3://"):
        options = {"endpoint_url": dataset.aws_endpoint_url, "region": dataset.aws_region_name}
    report = storage_for(uri, **options).download_prefix(uri, dest, progress=progress)
    if report.transferred + report.skipped == 0:
        raise ConfigError(f"dataset {dataset.id!r}: no objects under {uri}; check the bucket and prefix")
    return report
