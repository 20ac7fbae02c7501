"""Datasets on S3 or the Hub mirrored into ``<workdir>/data/<id>/`` (``job.data.location`` says where).

A dataset is remote when its ``instance_data_dir`` is a URI, or it is SimpleTuner's ``type: aws``
(``aws_bucket_name``, ``aws_data_prefix``, ``aws_endpoint_url``, ``aws_region_name``) or ``type:
huggingface`` (``job.fetch.hub_dataset``). Mirroring is incremental (the storage layer's manifest): a second
fetch moves no object bytes, a changed object is fetched again.

An S3 dataset's keys come from boto3's chain unless the backend sets ``aws_access_key_id`` and
``aws_secret_access_key`` (and ``aws_session_token``): those reach that backend's client only, never the
process environment, so the run URI, the model and the other datasets keep the chain's keys.
"""

from __future__ import annotations

from typing import Any

from job.config.backends import DatasetConfig
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


def s3_options(dataset: DatasetConfig) -> dict[str, Any]:
    """The ``S3Storage`` settings of an S3 dataset: its endpoint, region and, when the backend has them,
    its own keys."""
    options: dict[str, Any] = {"endpoint_url": dataset.aws_endpoint_url, "region": dataset.aws_region_name}
    if dataset.aws_access_key_id is not None and dataset.aws_secret_access_key is not None:
        options["access_key_id"] = dataset.aws_access_key_id.get_secret_value()
        options["secret_access_key"] = dataset.aws_secret_access_key.get_secret_value()
        if dataset.aws_session_token is not None:
            options["session_token"] = dataset.aws_session_token.get_secret_value()
    return options


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
    options = s3_options(dataset) if uri.startswith("s3://") else {}
    report = storage_for(uri, **options).download_prefix(uri, dest, progress=progress)
    if report.transferred + report.skipped == 0:
        raise ConfigError(f"dataset {dataset.id!r}: no objects under {uri}; check the bucket and prefix")
    return report
