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

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import tqdm as hf_tqdm

from job.errors import ConfigError
from job.storage import retry
from job.storage.base import ObjectInfo, TransferReport
from job.storage.hub_errors import IncompleteDownload, classifier
from job.storage.hub_lease import ConditionalWrites
from job.storage.sync import STAGING_NAME, Manifest, TransferProgress, iter_upload_files, plan_download
from job.storage.uri import URI, Location, parse_uri

T = TypeVar("T")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# The name snapshot_download gives its bar of bytes written to disk (huggingface_hub 1.x, 2.x); its bar
# of files (hf_thread_map's) has no unit. Other bars (network bytes) are not counted twice.
_BYTES_BAR = "huggingface_hub.snapshot_download"


class _QuietBar(hf_tqdm):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _bars_into(shown: TransferProgress) -> type[hf_tqdm]:
    """A silent bar class for snapshot_download whose counts go to ``shown`` (``job.progress``)
    instead of a carriage-return bar in the container log: its bytes bar's and its files bar's."""

    class _Forward(_QuietBar):
        def __init__(self, *args: Any, **kwargs: Any):
            self._kind = "bytes" if kwargs.get("name") == _BYTES_BAR else kwargs.get("unit", "files")
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._kind == "bytes":
                shown.add_bytes(int(n or 0))
            elif self._kind == "files":
                shown.file_done(count=int(n or 0))
            return super().update(n)

    return _Forward


def _in_repo(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


class HubStorage(ConditionalWrites):
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

    def _call(self, uri: URI, action: str, fn: Callable[[], T]) -> T:
        return retry.call(fn, what=f"{action} {uri}", classify=classifier(uri, action))

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
        total = sum(o.size for o, _ in todo)
        shown = TransferProgress(f"fetch {uri}", files=len(todo), total_bytes=total, enabled=progress)

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
                    tqdm_class=_bars_into(shown),
                )
            else:
                # An update of some files: naming each in allow_patterns costs files x patterns fnmatch calls
                # (minutes at 100k files), so fetch exactly those, the way snapshot_download does inside.
                self._fetch_files(pinned, wanted, staging, shown)
            missing = [p for p in wanted if not (staging / p).is_file()]
            if missing:
                raise IncompleteDownload(f"{len(missing)} files missing after download, e.g. {missing[0]}")

        with shown:
            self._call(uri, "download", fetch)
        try:
            for (obj, target), repo_path in zip(todo, wanted, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / repo_path, target)
                manifest.record(obj.key, obj)
        finally:
            manifest.save(str(uri))
        shutil.rmtree(staging, ignore_errors=True)
        return TransferReport(transferred=len(todo), skipped=skipped, bytes=total)

    def _fetch_files(self, pinned: URI, paths: Sequence[str], staging: Path, shown: TransferProgress) -> None:
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

        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="hub") as pool:
            for size in pool.map(one, paths):
                shown.file_done(size)

    def download_to_cache(
        self, repo_uri: Location, files: Sequence[str], cache_dir: str | Path, *, progress: bool = True
    ) -> Path:
        """Download ``files`` (paths in the repo) into huggingface_hub's cache layout under ``cache_dir``,
        where ``from_pretrained(cache_dir=…)`` and offline lookups find them; return the snapshot folder.
        Files already cached for the revision's current commit cost no request."""
        uri = self._hf_uri(repo_uri)
        # Exact names as patterns: a model repo has tens of files, so the fnmatch cost does not matter.
        patterns = [glob.escape(f) for f in files]
        # Sizes unknown until the listing snapshot_download makes itself: bytes counted, no total.
        shown = TransferProgress(f"fetch {uri}", files=len(files), total_bytes=None, enabled=progress)

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
                    tqdm_class=_bars_into(shown),
                )
            )
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise IncompleteDownload(f"{len(missing)} files missing after download, e.g. {missing[0]}")
            return folder

        with shown:
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
