"""Storage URIs and the three backends (local, S3 via boto3, Hub via huggingface_hub).

Importing this package is cheap: boto3 and huggingface_hub load only when ``storage_for`` hands out a
remote backend.
"""

from __future__ import annotations

import functools
import os
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


# Backends are built once per scheme, options and environment and then shared, so a boto3 client (about
# 0.1 s to build) serves every call of a run. The environment is part of the key because the client's
# endpoint, region and credentials come from it: every AWS_* variable for S3 (boto3 reads a dozen), every
# HF_* one for the Hub. A few entries at most: one per store in a job.
_ENV_PREFIXES = {"s3": ("AWS_", "LOKR_S3_"), "hf": ("HF_", "HUGGING_FACE_"), "file": ()}


def storage_for(uri: Location, **options: Any) -> Storage:
    """The backend that serves ``uri``. ``options`` go to the backend's constructor: for S3
    ``endpoint_url``/``region`` (SimpleTuner's ``aws_endpoint_url``/``aws_region_name``) and a dataset's own
    ``access_key_id``/``secret_access_key``/``session_token``, for the Hub
    ``endpoint``/``private``. Calls with the same settings and environment get the same (thread-safe)
    backend."""
    scheme = parse_uri(uri).scheme
    prefixes = _ENV_PREFIXES[scheme]
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes))) if prefixes else ()
    return _build(scheme, tuple(sorted(options.items())), env)


@functools.lru_cache(maxsize=16)
def _build(scheme: str, options: tuple[tuple[str, Any], ...], env: tuple[tuple[str, str], ...]) -> Storage:
    # ``env`` is only the cache key: the backends read the environment themselves.
    if scheme == "s3":
        from job.storage.s3 import S3Storage

        return S3Storage(**dict(options))
    if scheme == "hf":
        from job.storage.hub import HubStorage

        return HubStorage(**dict(options))
    from job.storage.local import LocalStorage

    return LocalStorage()
