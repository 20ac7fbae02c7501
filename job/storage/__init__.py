"""Storage URIs and the three backends (local, S3 via boto3, Hub via huggingface_hub).

Importing this package is cheap: boto3 and huggingface_hub load only when ``storage_for`` hands out a
remote backend.
"""

from __future__ import annotations

from typing import Any

from job.storage.base import ObjectInfo, Storage, TransferReport, Versioned
from job.storage.uri import URI, Location, is_remote, join, name, parent, parse_uri

__all__ = [
    "URI",
    "Location",
    "ObjectInfo",
    "Storage",
    "TransferReport",
    "Versioned",
    "is_remote",
    "join",
    "name",
    "parent",
    "parse_uri",
    "storage_for",
]


def storage_for(uri: Location, **options: Any) -> Storage:
    """The backend that serves ``uri``. ``options`` go to the backend's constructor: for S3
    ``endpoint_url``/``region`` (SimpleTuner's ``aws_endpoint_url``/``aws_region_name``) and a dataset's own
    ``access_key_id``/``secret_access_key``/``session_token``, for the Hub
    ``endpoint``/``private``."""
    scheme = parse_uri(uri).scheme
    if scheme == "s3":
        from job.storage.s3 import S3Storage

        return S3Storage(**options)
    if scheme == "hf":
        from job.storage.hub import HubStorage

        return HubStorage(**options)
    from job.storage.local import LocalStorage

    return LocalStorage()
