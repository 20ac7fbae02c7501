"""What a Hub failure means for the job: a refusal to raise at once (401/403, gated or disabled repos:
``PermissionDeniedError``; a missing repo, revision or file: ``ConfigError``) or a failure worth another
attempt (5xx, 429, dropped connections), for ``job.storage.retry``."""

from __future__ import annotations

import os

import httpx2
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from job.errors import ConfigError, JobError, PermissionDeniedError
from job.storage import retry
from job.storage.uri import URI


class IncompleteDownload(Exception):
    """snapshot_download returned without some requested files (it falls back to what is on disk when the
    Hub cannot be reached); treated as transient."""


def token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN set"
    try:
        from huggingface_hub import get_token

        return "saved login token" if get_token() else "no token"
    except Exception:
        return "no token"


def classifier(uri: URI, action: str) -> retry.Classifier:
    repo = f"{uri.repo_type} repo '{uri.repo_id}'"

    def classify(exc: BaseException) -> JobError | retry.Retryable | None:
        if isinstance(exc, LocalTokenNotFoundError):
            return PermissionDeniedError(f"no usable Hub token (set HF_TOKEN) to {action} {uri}")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403) or isinstance(exc, GatedRepoError | DisabledRepoError):
                return PermissionDeniedError(
                    f"the Hub refused access to {repo} trying to {action} {uri} (HTTP {status}); "
                    f"token: {token_source()}"
                )
            if isinstance(exc, RevisionNotFoundError):
                return ConfigError(f"revision '{uri.revision}' does not exist in {repo} ({uri})")
            if isinstance(exc, RemoteEntryNotFoundError):
                return ConfigError(f"{uri} does not exist (trying to {action} it)")
            if isinstance(exc, RepositoryNotFoundError) or status == 404:
                return ConfigError(
                    f"{repo} does not exist or is not visible with this token ({uri}; token: {token_source()})"
                )
            if status >= 500 or status in (408, 429):
                after = exc.response.headers.get("Retry-After") if exc.response is not None else None
                return retry.Retryable(exc, retry.parse_retry_after(after))
            return ConfigError(f"the Hub refused to {action} {uri}: {retry.describe(exc)}")
        if isinstance(exc, httpx2.TransportError | LocalEntryNotFoundError | IncompleteDownload):
            return retry.Retryable(exc)
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return retry.Retryable(exc)  # a body cut short more often than http_get's own resumes allow
        return None

    return classify
