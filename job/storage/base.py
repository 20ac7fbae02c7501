"""The one interface every storage backend (local, S3, Hub) offers, and the small records it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from job.storage.uri import Location


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object.

    ``key`` is relative to the prefix for ``list()`` and the full key/path for ``stat()``. ``etag`` is an
    opaque change token: the S3 ETag, the Hub's LFS sha256 or git blob id, or size+mtime for local files.
    ``mtime`` is seconds since the epoch, or None where the store does not say cheaply (the Hub).
    """

    key: str
    size: int
    etag: str | None = None
    mtime: float | None = None


@dataclass(frozen=True)
class TransferReport:
    """What a bulk transfer did: files moved, files skipped as already up to date, bytes moved."""

    transferred: int = 0
    skipped: int = 0
    bytes: int = 0

    def __add__(self, other: TransferReport) -> TransferReport:
        return TransferReport(
            self.transferred + other.transferred, self.skipped + other.skipped, self.bytes + other.bytes
        )


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the token ``replace_if`` compares against: the S3 ETag, the Hub commit the
    object was read at, or the sha256 of a local file's contents."""

    data: bytes
    version: str


@runtime_checkable
class Storage(Protocol):
    """A place objects live. URIs may be strings or parsed ``URI``s; prefixes have folder semantics
    (``s3://b/ckpt`` covers ``ckpt/…``, never ``ckpt-2/…``).

    Errors: ``ConfigError`` for a missing bucket/repo/object or a bad URI, ``PermissionDeniedError`` for
    refused credentials, ``TransientError`` once retries are exhausted.
    """

    def list(self, prefix: Location) -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursive), keys relative to it, sorted. A missing prefix is empty."""
        ...

    def stat(self, uri: Location) -> ObjectInfo | None:
        """The object at ``uri``, or None if there is none (a folder is not an object)."""
        ...

    def read_bytes(self, uri: Location) -> bytes: ...

    def write_bytes(self, uri: Location, data: bytes, *, commit_message: str | None = None) -> None: ...

    def download_file(self, uri: Location, local_path: str | Path) -> ObjectInfo:
        """Fetch one object to ``local_path`` atomically (temp name in the same folder, then rename)."""
        ...

    def download_prefix(
        self,
        prefix_uri: Location,
        local_dir: str | Path,
        *,
        progress: bool = True,
        allow_patterns: Sequence[str] | None = None,
    ) -> TransferReport:
        """Mirror ``prefix_uri`` into ``local_dir``, skipping files the local manifest says are current.

        ``allow_patterns`` are fnmatch patterns on keys relative to the prefix (``*`` crosses ``/``, as in
        huggingface_hub). Files removed remotely are left in place locally.
        """
        ...

    def upload_file(
        self, local_path: str | Path, uri: Location, *, commit_message: str | None = None
    ) -> None: ...

    def upload_folder(
        self,
        local_dir: str | Path,
        prefix_uri: Location,
        *,
        commit_message: str | None = None,
        progress: bool = True,
    ) -> TransferReport:
        """Upload every file under ``local_dir`` (the download manifest and temp files excluded). On the Hub
        this is exactly one commit."""
        ...

    def delete(self, uri: Location) -> None:
        """Delete the object at ``uri`` and everything under ``uri/``. Missing is fine; the root is refused."""
        ...

    # Conditional writes, for the run lease (job/lease.py) only: each is one atomic step of the store itself,
    # so two processes racing for the same object cannot both win.

    def read_versioned(self, uri: Location) -> Versioned | None:
        """The object's bytes with its version token, or None if there is none."""
        ...

    def create_exclusive(self, uri: Location, data: bytes) -> bool:
        """Write ``data`` only if no object is at ``uri``; False (nothing written) if one is."""
        ...

    def replace_if(self, uri: Location, data: bytes, version: str) -> bool:
        """Write ``data`` only if the object is still at ``version``; False (nothing written) if it changed
        or is gone."""
        ...
