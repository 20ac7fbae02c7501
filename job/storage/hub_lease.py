"""Conditional writes on a Hub repo, for the run lease (``job.lease``): the part of ``HubStorage`` that
makes "create if absent" and "replace if unchanged" single atomic steps of the Hub itself.

A repo has one version, its head commit: a file is "unchanged" when no commit at all has landed since it
was read, and a commit made with ``parent_commit`` fails with 412 otherwise. A commit by the same process
(a checkpoint) therefore also counts as a change; the lease re-reads and tries again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from job.errors import ConfigError, TransientError
from job.storage.base import ObjectInfo, Versioned
from job.storage.uri import URI, Location

T = TypeVar("T")

# How often create_exclusive re-reads the repo when unrelated commits keep landing between its read and
# its commit (each attempt is one round of requests; a checkpoint commit takes seconds, not minutes).
_CREATE_ATTEMPTS = 8


class HubReads(Protocol):
    """What the mix-in uses of ``HubStorage``: its reads, its retries and its client."""

    def _api(self) -> HfApi: ...
    def _hf_uri(self, uri: Location) -> URI: ...
    def _file_path(self, uri: URI) -> str: ...
    def _call(self, uri: URI, action: str, fn: Callable[[], T]) -> T: ...
    def _ensure_repo(self, uri: URI) -> None: ...
    def _repo_exists(self, uri: URI) -> bool: ...
    def _commit_on(self, uri: URI, data: bytes, parent: str) -> bool: ...
    def resolve_revision(self, uri: Location) -> str: ...
    def stat(self, uri: Location) -> ObjectInfo | None: ...
    def read_bytes(self, uri: Location) -> bytes: ...


class ConditionalWrites:
    """Mixed into ``HubStorage``."""

    def read_versioned(self: HubReads, uri: Location) -> Versioned | None:
        parsed = self._hf_uri(uri)
        self._file_path(parsed)
        try:
            sha = self.resolve_revision(parsed)
        except ConfigError:
            if not self._repo_exists(parsed):
                return None  # a run URI in a repo not made yet: create_exclusive makes it
            raise
        pinned = replace(parsed, revision=sha)
        if self.stat(pinned) is None:
            return None
        return Versioned(self.read_bytes(pinned), sha)

    def _repo_exists(self: HubReads, uri: URI) -> bool:
        return self._call(
            uri,
            "look for",
            lambda: self._api().repo_exists(uri.repo_id, repo_type=uri.repo_type),
        )

    def create_exclusive(self: HubReads, uri: Location, data: bytes) -> bool:
        parsed = self._hf_uri(uri)
        self._file_path(parsed)
        self._ensure_repo(parsed)
        for _ in range(_CREATE_ATTEMPTS):
            sha = self.resolve_revision(parsed)
            if self.stat(replace(parsed, revision=sha)) is not None:
                return False
            if self._commit_on(parsed, data, sha):
                return True
            # Some commit landed in between: look again whether it made the file.
        raise TransientError(
            f"{parsed}: the repo kept changing while creating this file ({_CREATE_ATTEMPTS} attempts); run again"
        )

    def replace_if(self: HubReads, uri: Location, data: bytes, version: str) -> bool:
        parsed = self._hf_uri(uri)
        self._file_path(parsed)
        return self._commit_on(parsed, data, version)

    def _commit_on(self: HubReads, uri: URI, data: bytes, parent: str) -> bool:
        """One commit of ``data`` at ``uri`` whose parent must be ``parent``; False if the head moved."""
        path = self._file_path(uri)

        def commit() -> bool:
            try:
                self._api().create_commit(
                    uri.repo_id,
                    [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)],
                    commit_message=f"lokr-job: {path}",
                    repo_type=uri.repo_type,
                    revision=uri.revision,
                    parent_commit=parent,
                )
            except HfHubHTTPError as exc:
                # 412 is the answer to a stale parent commit (the classifier would call it a refusal).
                if exc.response is not None and exc.response.status_code == 412:
                    return False
                raise
            return True

        return self._call(uri, "write", commit)
