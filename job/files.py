"""Durable file writes shared by every stage: write-then-rename, content hashes, fsync.

A reader (or a job killed mid-write) sees the old file or the new one, never half: the data goes to a
temporary file beside the target, then ``os.replace`` swaps it in (atomic on POSIX within one
filesystem). ``durable=True`` also fsyncs the data first, for what must survive a power cut
(checkpoints, the adapter); caches can always be rebuilt and skip it.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job.oserrors import writing


def write_atomic(path: Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Call ``write(temporary_path)`` and move the result to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with writing(path):  # a full disk names the file, even where the writer (safetensors) does not
            write(Path(temporary))
        if durable:
            fsync_file(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp's 0600 is for secrets; these files are not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    write_atomic(path, lambda temporary: temporary.write_bytes(data), durable=durable)


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (a cache file can always be rebuilt)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
