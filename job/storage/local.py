"""The local filesystem (and mounted volumes) behind the same interface as S3 and the Hub."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from job.errors import ConfigError, PermissionDeniedError
from job.files import write_atomic, write_bytes_atomic
from job.storage.base import ObjectInfo, TransferReport, Versioned
from job.storage.sync import Manifest, TransferProgress, iter_upload_files, plan_download
from job.storage.uri import Location, parse_uri


def _path(uri: Location) -> Path:
    parsed = parse_uri(uri)
    if parsed.scheme != "file":
        raise ConfigError(f"{uri} is not a local path")
    return Path(parsed.path)


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    # size+mtime is the cheap change token; hashing every file of a dataset on each fetch would not be.
    return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", mtime=st.st_mtime)


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc}") from exc
    except PermissionError as exc:
        raise PermissionDeniedError(f"{what}: permission denied ({exc.filename})") from exc


def _copy_atomic(src: Path, dst: Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


@contextlib.contextmanager
def _guarded(path: Path, operation: int) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``<path>.lock`` (a sidecar: the object itself is replaced by rename, which a
    lock on it would not survive): shared to read, exclusive to write, so check-then-write is atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _versioned(path: Path) -> Versioned | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Versioned(data, hashlib.sha256(data).hexdigest())


class LocalStorage:
    def list(self, prefix: Location) -> list[ObjectInfo]:
        root = _path(prefix)
        if not root.is_dir():
            return []
        with _os_errors(f"cannot list {root}"):
            return [_info(rel, path.stat()) for rel, path in iter_upload_files(root)]

    def stat(self, uri: Location) -> ObjectInfo | None:
        path = _path(uri)
        with _os_errors(f"cannot stat {path}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
        return _info(str(path), st) if path.is_file() else None

    def read_bytes(self, uri: Location) -> bytes:
        path = _path(uri)
        with _os_errors(f"cannot read {path}"):
            return path.read_bytes()

    def write_bytes(self, uri: Location, data: bytes, *, commit_message: str | None = None) -> None:
        path = _path(uri)
        with _os_errors(f"cannot write {path}"):
            write_bytes_atomic(path, data)

    def download_file(self, uri: Location, local_path: str | Path) -> ObjectInfo:
        src = _path(uri)
        with _os_errors(f"cannot copy {src}"):
            info = _info(str(src), src.stat())
            _copy_atomic(src, Path(local_path))
        return info

    def download_prefix(
        self,
        prefix_uri: Location,
        local_dir: str | Path,
        *,
        progress: bool = True,
        allow_patterns: Sequence[str] | None = None,
    ) -> TransferReport:
        root = _path(prefix_uri)
        if not root.is_dir():
            raise ConfigError(f"{root} is not a folder")
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(dest)
        todo, skipped = plan_download(
            self.list(root), dest, manifest, source=str(root), allow_patterns=allow_patterns
        )
        moved = 0
        total = sum(o.size for o, _ in todo)
        shown = TransferProgress(f"copy {root}", files=len(todo), total_bytes=total, enabled=progress)
        try:
            with shown, _os_errors(f"cannot copy from {root}"):
                for obj, target in todo:
                    _copy_atomic(root / obj.key, target)
                    manifest.record(obj.key, obj)
                    moved += obj.size
                    shown.file_done(obj.size)
        finally:
            manifest.save(str(root))
        return TransferReport(transferred=len(todo), skipped=skipped, bytes=moved)

    def upload_file(
        self, local_path: str | Path, uri: Location, *, commit_message: str | None = None
    ) -> None:
        dst = _path(uri)
        with _os_errors(f"cannot copy {local_path} to {dst}"):
            _copy_atomic(Path(local_path), dst)

    def upload_folder(
        self,
        local_dir: str | Path,
        prefix_uri: Location,
        *,
        commit_message: str | None = None,
        progress: bool = True,
    ) -> TransferReport:
        src, dst = Path(local_dir), _path(prefix_uri)
        if not src.is_dir():
            raise ConfigError(f"cannot upload {src}: not a folder")
        files = list(iter_upload_files(src))
        total = 0
        with _os_errors(f"cannot copy {src} to {dst}"):
            for rel, path in files:
                _copy_atomic(path, dst / rel)
                total += path.stat().st_size
        return TransferReport(transferred=len(files), bytes=total)

    def delete(self, uri: Location) -> None:
        path = _path(uri)
        if path.resolve() == Path(path.resolve().anchor):
            raise ConfigError(f"refusing to delete the filesystem root {path}")
        with _os_errors(f"cannot delete {path}"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def read_versioned(self, uri: Location) -> Versioned | None:
        path = _path(uri)
        if not path.exists():
            return None
        with _os_errors(f"cannot read {path}"), _guarded(path, fcntl.LOCK_SH):
            return _versioned(path)

    def create_exclusive(self, uri: Location, data: bytes) -> bool:
        path = _path(uri)
        with _os_errors(f"cannot create {path}"), _guarded(path, fcntl.LOCK_EX):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                return False
            # Readers take the shared lock, so none sees the file before it is whole.
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        return True

    def replace_if(self, uri: Location, data: bytes, version: str) -> bool:
        path = _path(uri)
        with _os_errors(f"cannot replace {path}"), _guarded(path, fcntl.LOCK_EX):
            current = _versioned(path)
            if current is None or current.version != version:
                return False
            write_bytes_atomic(path, data, durable=True)
        return True
