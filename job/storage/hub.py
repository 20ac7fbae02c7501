"""Hugging Face Hub model and dataset repos through huggingface_hub.

The endpoint is read from ``HF_ENDPOINT`` at call time and passed explicitly (huggingface_hub reads it once,
at import). The token is huggingface_hub's own business (``HF_TOKEN``, else a saved login). Every upload
call is exactly one commit: the Hub allows about 128 commits per hour per repo.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
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
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import tqdm as hf_tqdm

from job.errors import ConfigError, JobError, PermissionDeniedError, TransientError
from job.storage import retry
from job.storage.base import ObjectInfo, TransferReport, Versioned
from job.storage.sync import STAGING_NAME, Manifest, iter_upload_files, plan_download, progress_bar
from job.storage.uri import URI, Location, parse_uri

T = TypeVar("T")
# How often create_exclusive re-reads the repo when unrelated commits keep landing between its read and
# its commit (each attempt is one round of requests; a checkpoint commit takes seconds, not minutes).
_CREATE_ATTEMPTS = 8
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class _QuietBar(hf_tqdm):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class _IncompleteDownload(Exception):
    """snapshot_download returned without some requested files (it falls back to what is on disk when the
    Hub cannot be reached); treated as transient."""


def _in_repo(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN set"
    try:
        from huggingface_hub import get_token

        return "saved login token" if get_token() else "no token"
    except Exception:
        return "no token"


class HubStorage:
    def __init__(self, *, endpoint: str | None = None, private: bool = True, max_workers: int = 8):
        self._fixed_endpoint = endpoint
        self._private = private
        self._workers = max_workers
        self._ensured: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------------

    def _endpoint(self) -> str | None:
        endpoint = self._fixed_endpoint or os.environ.get("HF_ENDPOINT")
        return endpoint.rstrip("/") if endpoint else None

    def _api(self) -> HfApi:
        return HfApi(endpoint=self._endpoint())

    @staticmethod
    def _hf_uri(uri: Location) -> URI:
        parsed = parse_uri(uri)
        if parsed.scheme != "hf":
            raise ConfigError(f"{uri} is not an hf:// URI")
        return parsed

    @staticmethod
    def _file_path(uri: URI) -> str:
        if not uri.path:
            raise ConfigError(f"{uri} names a repo, not a file in it")
        return uri.path

    def _classifier(self, uri: URI, action: str) -> retry.Classifier:
        repo = f"{uri.repo_type} repo '{uri.repo_id}'"

        def classify(exc: BaseException) -> JobError | retry.Retryable | None:
            if isinstance(exc, LocalTokenNotFoundError):
                return PermissionDeniedError(f"no usable Hub token (set HF_TOKEN) to {action} {uri}")
            if isinstance(exc, HfHubHTTPError):
                status = exc.response.status_code if exc.response is not None else 0
                if status in (401, 403) or isinstance(exc, GatedRepoError | DisabledRepoError):
                    return PermissionDeniedError(
                        f"the Hub refused access to {repo} trying to {action} {uri} (HTTP {status}); "
                        f"token: {_token_source()}"
                    )
                if isinstance(exc, RevisionNotFoundError):
                    return ConfigError(f"revision '{uri.revision}' does not exist in {repo} ({uri})")
                if isinstance(exc, RemoteEntryNotFoundError):
                    return ConfigError(f"{uri} does not exist (trying to {action} it)")
                if isinstance(exc, RepositoryNotFoundError) or status == 404:
                    return ConfigError(
                        f"{repo} does not exist or is not visible with this token ({uri}; token: {_token_source()})"
                    )
                if status >= 500 or status in (408, 429):
                    after = exc.response.headers.get("Retry-After") if exc.response is not None else None
                    return retry.Retryable(exc, retry.parse_retry_after(after))
                return ConfigError(f"the Hub refused to {action} {uri}: {retry.describe(exc)}")
            if isinstance(exc, httpx2.TransportError | LocalEntryNotFoundError | _IncompleteDownload):
                return retry.Retryable(exc)
            if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
                return retry.Retryable(exc)  # a body cut short more often than http_get's own resumes allow
            return None

        return classify

    def _call(self, uri: URI, action: str, fn: Callable[[], T]) -> T:
        return retry.call(fn, what=f"{action} {uri}", classify=self._classifier(uri, action))

    def call(self, uri: Location, action: str, fn: Callable[[HfApi], T]) -> T:
        """One huggingface_hub API call (``fn`` gets the client) with this store's retries and exit codes,
        for what no storage method asks (``lokr-job check``: whoami, model_info, repo_exists)."""
        api = self._api()
        return self._call(self._hf_uri(uri), action, lambda: fn(api))

    def _ensure_repo(self, uri: URI) -> None:
        key = (uri.repo_type, uri.repo_id)
        with self._lock:
            if key in self._ensured:
                return
        self._call(
            uri,
            "create",
            lambda: self._api().create_repo(
                uri.repo_id, repo_type=uri.repo_type, private=self._private, exist_ok=True
            ),
        )
        with self._lock:
            self._ensured.add(key)

    def resolve_revision(self, uri: Location) -> str:
        """The commit sha that ``uri``'s revision (default branch when None) points at now."""
        parsed = self._hf_uri(uri)
        if parsed.revision and _COMMIT_SHA.match(parsed.revision):
            return parsed.revision
        info = self._call(
            parsed,
            "resolve the revision of",
            lambda: self._api().repo_info(
                parsed.repo_id, repo_type=parsed.repo_type, revision=parsed.revision
            ),
        )
        if not info.sha:
            raise ConfigError(f"the Hub gave no commit for {parsed}")
        return info.sha

    # -- reading --------------------------------------------------------------------------------------

    def list(self, prefix: Location) -> list[ObjectInfo]:
        uri = self._hf_uri(prefix)
        base = f"{uri.path}/" if uri.path else ""

        def run() -> list[ObjectInfo]:
            try:
                entries = list(
                    self._api().list_repo_tree(
                        uri.repo_id,
                        path_in_repo=uri.path or None,
                        recursive=True,
                        revision=uri.revision,
                        repo_type=uri.repo_type,
                    )
                )
            except RemoteEntryNotFoundError:
                return []
            return [
                ObjectInfo(
                    key=entry.path[len(base) :],
                    size=int(entry.size),
                    etag=entry.lfs.sha256 if entry.lfs is not None else entry.blob_id,
                )
                for entry in entries
                if isinstance(entry, RepoFile) and entry.path.startswith(base)
            ]

        return sorted(self._call(uri, "list", run), key=lambda o: o.key)

    def stat(self, uri: Location) -> ObjectInfo | None:
        parsed = self._hf_uri(uri)
        path = self._file_path(parsed)
        infos = self._call(
            parsed,
            "stat",
            lambda: self._api().get_paths_info(
                parsed.repo_id, [path], revision=parsed.revision, repo_type=parsed.repo_type
            ),
        )
        for entry in infos:
            if isinstance(entry, RepoFile) and entry.path == path:
                etag = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
                return ObjectInfo(key=path, size=int(entry.size), etag=etag)
        return None

    def _fetch_one(self, uri: URI, folder: Path) -> Path:
        path = self._file_path(uri)
        found = self._call(
            uri,
            "download",
            lambda: hf_hub_download(
                uri.repo_id,
                filename=path,
                repo_type=uri.repo_type,
                revision=uri.revision,
                local_dir=folder,
                endpoint=self._endpoint(),
                tqdm_class=_QuietBar,
            ),
        )
        return Path(str(found))

    def read_bytes(self, uri: Location) -> bytes:
        parsed = self._hf_uri(uri)
        with tempfile.TemporaryDirectory(prefix="lokr-hub-") as tmp:
            return self._fetch_one(parsed, Path(tmp)).read_bytes()

    def download_file(self, uri: Location, local_path: str | Path) -> ObjectInfo:
        parsed = self._hf_uri(uri)
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Stage beside the target (same filesystem) so the final step is one atomic rename.
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_NAME}-", dir=target.parent))
        try:
            fetched = self._fetch_one(parsed, staging)
            size = fetched.stat().st_size
            os.replace(fetched, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ObjectInfo(key=parsed.path, size=size)

    def download_prefix(
        self,
        prefix_uri: Location,
        local_dir: str | Path,
        *,
        progress: bool = True,
        allow_patterns: Sequence[str] | None = None,
    ) -> TransferReport:
        uri = self._hf_uri(prefix_uri)
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(dest)
        # Pin the commit first: the listing, the download and the manifest then all describe one snapshot.
        pinned = replace(uri, revision=self.resolve_revision(uri))
        objects = self.list(pinned)
        todo, skipped = plan_download(objects, dest, manifest, source=str(uri), allow_patterns=allow_patterns)
        if not todo:
            manifest.save(str(uri))
            return TransferReport(skipped=skipped)

        # huggingface_hub lays files out by their path in the repo; stage them in a hidden folder inside
        # local_dir (same filesystem) and rename each into place under its path relative to the prefix. The
        # staging folder survives a failed attempt, so a retry or a rerun resumes instead of starting over.
        staging = dest / STAGING_NAME
        marker = staging / ".lokr-commit"
        if staging.exists() and (not marker.is_file() or marker.read_text() != pinned.revision):
            # Left by a run against another commit: its files may be stale versions of the ones we want.
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        marker.write_text(str(pinned.revision))
        wanted = [_in_repo(uri.path, obj.key) for obj, _ in todo]

        def fetch() -> None:
            if skipped == 0:
                # Everything that matches is wanted: one snapshot_download with the same patterns.
                root = glob.escape(uri.path)
                patterns = [_in_repo(root, p) for p in allow_patterns or ["*"]]
                snapshot_download(
                    uri.repo_id,
                    repo_type=uri.repo_type,
                    revision=pinned.revision,
                    local_dir=staging,
                    allow_patterns=patterns,
                    endpoint=self._endpoint(),
                    max_workers=self._workers,
                    tqdm_class=None if progress else _QuietBar,
                )
            else:
                # An update of some files: naming each in allow_patterns costs files x patterns fnmatch calls
                # (minutes at 100k files), so fetch exactly those, the way snapshot_download does inside.
                self._fetch_files(pinned, wanted, staging, sum(o.size for o, _ in todo), progress)
            missing = [p for p in wanted if not (staging / p).is_file()]
            if missing:
                raise _IncompleteDownload(f"{len(missing)} files missing after download, e.g. {missing[0]}")

        self._call(uri, "download", fetch)
        try:
            for (obj, target), repo_path in zip(todo, wanted, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / repo_path, target)
                manifest.record(obj.key, obj)
        finally:
            manifest.save(str(uri))
        shutil.rmtree(staging, ignore_errors=True)
        return TransferReport(transferred=len(todo), skipped=skipped, bytes=sum(o.size for o, _ in todo))

    def _fetch_files(
        self, pinned: URI, paths: Sequence[str], staging: Path, total: int, progress: bool
    ) -> None:
        def one(path: str) -> int:
            hf_hub_download(
                pinned.repo_id,
                filename=path,
                repo_type=pinned.repo_type,
                revision=pinned.revision,
                local_dir=staging,
                endpoint=self._endpoint(),
                tqdm_class=_QuietBar,
            )
            return (staging / path).stat().st_size

        with (
            progress_bar(total=total, desc=f"fetch {pinned}", enabled=progress) as bar,
            ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="hub") as pool,
        ):
            for size in pool.map(one, paths):
                bar.update(size)

    def download_to_cache(
        self, repo_uri: Location, files: Sequence[str], cache_dir: str | Path, *, progress: bool = True
    ) -> Path:
        """Download ``files`` (paths in the repo) into huggingface_hub's cache layout under ``cache_dir``,
        where ``from_pretrained(cache_dir=…)`` and offline lookups find them; return the snapshot folder.
        Files already cached for the revision's current commit cost no request."""
        uri = self._hf_uri(repo_uri)
        # Exact names as patterns: a model repo has tens of files, so the fnmatch cost does not matter.
        patterns = [glob.escape(f) for f in files]

        def fetch() -> Path:
            folder = Path(
                snapshot_download(
                    uri.repo_id,
                    repo_type=uri.repo_type,
                    revision=uri.revision,
                    cache_dir=cache_dir,
                    allow_patterns=patterns,
                    endpoint=self._endpoint(),
                    max_workers=self._workers,
                    tqdm_class=None if progress else _QuietBar,
                )
            )
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise _IncompleteDownload(f"{len(missing)} files missing after download, e.g. {missing[0]}")
            return folder

        return self._call(uri, "download", fetch)

    # -- writing --------------------------------------------------------------------------------------

    def write_bytes(self, uri: Location, data: bytes, *, commit_message: str | None = None) -> None:
        parsed = self._hf_uri(uri)
        path = self._file_path(parsed)
        self._ensure_repo(parsed)
        self._call(
            parsed,
            "write",
            lambda: self._api().upload_file(
                path_or_fileobj=data,
                path_in_repo=path,
                repo_id=parsed.repo_id,
                repo_type=parsed.repo_type,
                revision=parsed.revision,
                commit_message=commit_message or f"Upload {path}",
            ),
        )

    def upload_file(
        self, local_path: str | Path, uri: Location, *, commit_message: str | None = None
    ) -> None:
        parsed = self._hf_uri(uri)
        path = self._file_path(parsed)
        source = Path(local_path)
        if not source.is_file():
            raise ConfigError(f"cannot upload {source}: not a file")
        self._ensure_repo(parsed)
        self._call(
            parsed,
            "upload",
            lambda: self._api().upload_file(
                path_or_fileobj=str(source),
                path_in_repo=path,
                repo_id=parsed.repo_id,
                repo_type=parsed.repo_type,
                revision=parsed.revision,
                commit_message=commit_message or f"Upload {path}",
            ),
        )

    def upload_folder(
        self,
        local_dir: str | Path,
        prefix_uri: Location,
        *,
        commit_message: str | None = None,
        progress: bool = True,
    ) -> TransferReport:
        uri = self._hf_uri(prefix_uri)
        src = Path(local_dir)
        if not src.is_dir():
            raise ConfigError(f"cannot upload {src}: not a folder")
        files = list(iter_upload_files(src))
        if not files:
            return TransferReport()
        self._ensure_repo(uri)
        # HfApi.upload_folder may split a large folder into several commits when hf_xet is installed; one
        # create_commit keeps an upload atomic and within the Hub's commit rate limit. The operations are
        # built once: a retry then reuses the hashes and skips LFS files already uploaded.
        operations = [
            CommitOperationAdd(path_in_repo=_in_repo(uri.path, rel), path_or_fileobj=str(p))
            for rel, p in files
        ]
        self._call(
            uri,
            "upload to",
            lambda: self._api().create_commit(
                uri.repo_id,
                operations,
                commit_message=commit_message or f"Upload {len(files)} files to {uri.path or '/'}",
                repo_type=uri.repo_type,
                revision=uri.revision,
            ),
        )
        return TransferReport(transferred=len(files), bytes=sum(p.stat().st_size for _, p in files))

    # -- conditional writes (the run lease) ------------------------------------------------------------
    # A repo has one version, its head commit: a file is "unchanged" when no commit at all has landed since
    # it was read, and a commit made with parent_commit fails with 412 otherwise. A commit by the same
    # process (a checkpoint) therefore also counts as a change; the lease re-reads and tries again.

    def read_versioned(self, uri: Location) -> Versioned | None:
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

    def _repo_exists(self, uri: URI) -> bool:
        return self._call(
            uri,
            "look for",
            lambda: self._api().repo_exists(uri.repo_id, repo_type=uri.repo_type),
        )

    def create_exclusive(self, uri: Location, data: bytes) -> bool:
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

    def replace_if(self, uri: Location, data: bytes, version: str) -> bool:
        parsed = self._hf_uri(uri)
        self._file_path(parsed)
        return self._commit_on(parsed, data, version)

    def _commit_on(self, uri: URI, data: bytes, parent: str) -> bool:
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

    def delete(self, uri: Location) -> None:
        parsed = self._hf_uri(uri)
        path = self._file_path(parsed)
        api = self._api()
        infos = self._call(
            parsed,
            "stat",
            lambda: api.get_paths_info(
                parsed.repo_id, [path], revision=parsed.revision, repo_type=parsed.repo_type
            ),
        )
        entry = next((e for e in infos if e.path == path), None)
        if entry is None:
            return
        remove = api.delete_folder if isinstance(entry, RepoFolder) else api.delete_file

        def run() -> None:
            # Not-found on a retry means an earlier attempt's commit landed but its answer was lost.
            with contextlib.suppress(RemoteEntryNotFoundError):
                remove(
                    path,
                    parsed.repo_id,
                    repo_type=parsed.repo_type,
                    revision=parsed.revision,
                    commit_message=f"Delete {path}",
                )

        self._call(parsed, "delete", run)
