"""What the backends share when moving folders: safe local paths, the download manifest, upload file lists
and transfer progress.

The manifest (``<local_dir>/.lokr-manifest.json``) records, per relative path, the size and etag of the
object last downloaded there. A file is skipped when the remote size+etag match the manifest and the local
file still has that size, so a second fetch of an unchanged prefix moves no object bytes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from job.errors import ConfigError
from job.files import PART_SUFFIX, write_bytes_atomic
from job.progress import Progress
from job.storage.base import ObjectInfo

MANIFEST_NAME = ".lokr-manifest.json"
STAGING_NAME = ".lokr-staging"
# Our own bookkeeping and huggingface_hub's local-dir metadata never travel in either direction.
_INTERNAL_NAMES = (MANIFEST_NAME, STAGING_NAME)
_INTERNAL_DIRS = (".cache/huggingface", ".git")


def is_internal(rel: str) -> bool:
    parts = rel.split("/")
    if (
        parts[0].startswith(_INTERNAL_NAMES)
        or parts[-1].endswith(PART_SUFFIX)
        or PART_SUFFIX + "." in parts[-1]
    ):
        return True
    return any(rel == d or rel.startswith(d + "/") for d in _INTERNAL_DIRS)


def unsafe_reason(key: str) -> str | None:
    """Why ``key`` cannot become a path under a download folder, or None if it can."""
    if not key:
        return "empty key"
    if "\x00" in key or "\\" in key:
        return "NUL or backslash in key"
    if key.startswith("/"):
        return "absolute path"
    parts = key.split("/")
    if ".." in parts:
        return "'..' would escape the download folder"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path segment"
    return None


def local_target(local_dir: Path, rel: str, inside: set[Path]) -> Path:
    """``local_dir/rel``, refusing anything that would land outside ``local_dir`` (symlinks included).
    ``inside`` holds folders already found inside it: resolving each file's folder again costs more than
    fetching a small object."""
    reason = unsafe_reason(rel)
    if reason:
        raise ConfigError(f"refusing to write {rel!r} under {local_dir}: {reason}")
    target = local_dir / rel
    if target.parent not in inside:
        if not target.parent.resolve().is_relative_to(local_dir.resolve()):
            raise ConfigError(f"refusing to write {rel!r}: it resolves outside {local_dir}")
        inside.add(target.parent)
    return target


def match_patterns(rel: str, allow_patterns: Sequence[str] | None) -> bool:
    """fnmatch with huggingface_hub's conventions: ``*`` crosses ``/``, a pattern ending in ``/`` is a folder."""
    if not allow_patterns:
        return True
    for pattern in allow_patterns:
        if pattern.endswith("/"):
            pattern += "*"
        if fnmatch.fnmatchcase(rel, pattern):
            return True
    return False


class Manifest:
    """The record of what was downloaded into one folder. Thread-safe ``record``; ``save`` is atomic."""

    def __init__(self, local_dir: Path):
        self.path = local_dir / MANIFEST_NAME
        self._lock = threading.Lock()
        self._files: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self._files = dict(data["files"])

    def is_current(self, rel: str, info: ObjectInfo, target: Path) -> bool:
        entry = self._files.get(rel)
        if not entry or info.etag is None or entry.get("etag") != info.etag or entry.get("size") != info.size:
            return False
        try:
            return target.stat().st_size == info.size
        except OSError:
            return False

    def record(self, rel: str, info: ObjectInfo) -> None:
        with self._lock:
            self._files[rel] = {"size": info.size, "etag": info.etag}

    def save(self, source: str) -> None:
        with self._lock:
            payload = {"version": 1, "source": source, "files": dict(sorted(self._files.items()))}
        write_bytes_atomic(self.path, json.dumps(payload, indent=1).encode())


def plan_download(
    objects: Sequence[ObjectInfo],
    local_dir: Path,
    manifest: Manifest,
    *,
    source: str,
    allow_patterns: Sequence[str] | None,
) -> tuple[list[tuple[ObjectInfo, Path]], int]:
    """Split a listing into (objects to fetch with their local targets, number already current).

    Raises ``ConfigError`` naming every key that would escape ``local_dir`` before anything is written.
    """
    unsafe = [(o.key, r) for o in objects if not o.key.endswith("/") and (r := unsafe_reason(o.key))]
    if unsafe:
        shown = "; ".join(f"{k!r} ({r})" for k, r in unsafe[:5])
        more = f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else ""
        raise ConfigError(f"refusing to download from {source}: unsafe keys {shown}{more}")
    todo: list[tuple[ObjectInfo, Path]] = []
    skipped = 0
    inside: set[Path] = set()
    for obj in objects:
        # Keys ending in "/" are the folder markers some S3 tools write; they hold no data.
        if obj.key.endswith("/") or is_internal(obj.key) or not match_patterns(obj.key, allow_patterns):
            continue
        target = local_target(local_dir, obj.key, inside)
        if manifest.is_current(obj.key, obj, target):
            skipped += 1
        else:
            todo.append((obj, target))
    return todo, skipped


def iter_upload_files(local_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) for every regular file under ``local_dir``, bookkeeping excluded, sorted."""
    found: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(local_dir):
        dirs.sort()
        for fname in names:
            path = Path(folder) / fname
            rel = path.relative_to(local_dir).as_posix()
            if not is_internal(rel) and path.is_file():
                found.append((rel, path))
    yield from sorted(found)


class TransferProgress:
    """Bytes and files moved by one bulk transfer, reported through ``job.progress``: a bar on a
    terminal, otherwise a log line with rate and ETA every 30 s and one at the end (container logs).
    Thread-safe; does nothing when ``enabled`` is False."""

    def __init__(self, desc: str, *, files: int, total_bytes: int | None, enabled: bool):
        self._files, self._done = files, 0
        self._lock = threading.Lock()
        self._progress = Progress(desc, total_bytes, unit="B") if enabled and files else None

    def add_bytes(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress.update(n)

    def file_done(self, size: int = 0, count: int = 1) -> None:
        """``count`` more files complete; ``size`` is their bytes not already counted by ``add_bytes``."""
        if self._progress is not None:
            with self._lock:
                self._done += count
                self._progress.set_postfix(files=f"{self._done}/{self._files}")
                self._progress.update(size)

    def __enter__(self) -> TransferProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.close()
