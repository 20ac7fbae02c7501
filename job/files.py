"""Durable file writes shared by every stage: write-then-rename, content hashes, fsync.

A reader (or a job killed mid-write) sees the old file or the new one, never half: the data goes to a
temporary file beside the target, then ``os.replace`` swaps it in (atomic on POSIX within one
filesystem). ``durable=True`` also fsyncs the data before the rename and the folder after it, for what
must survive a power cut (checkpoints, the adapter); caches can always be rebuilt and skip it.

Everything the job leaves behind has the modes a plain ``open()`` or ``mkdir()`` would give (0644 and
0755 under the usual umask 022), whoever wrote it: the image's non-root user must read what root wrote
(a tiny job, a mounted run URI). Temporary files and folders (``mkstemp``, ``mkdtemp``: 0600 and 0700)
and safetensors' ``save_file`` (0600 whatever the umask) would leave them private to their owner.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job.oserrors import writing

# The end of every temporary file name written here: uploads and listings skip such names (a file a kill
# left half-written must never reach a run URI or the Hub).
PART_SUFFIX = ".lokr-part"


def write_atomic(
    path: Path,
    write: Callable[[Path], object],
    *,
    durable: bool = False,
    size: int | None = None,
) -> None:
    """Call ``write(temporary_path)`` and move the result to ``path``.

    The temporary file is ``.<name>.<random>`` + ``PART_SUFFIX`` beside ``path``, a name the storage
    sync skips, so one left by a kill is never uploaded; ``size``, when known, goes into the full-disk
    error. ``write`` may stream into the file or replace it with a rename of its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        with writing(path, size):  # a full disk names the file, even where the writer (safetensors) does not
            write(Path(temporary))
        if durable:
            fsync_file(Path(temporary))
        os.chmod(temporary, file_mode())  # mkstemp's 0600 is for secrets; these files are not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``mkdir()`` gives a new folder under the process umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # Read, not set: os.umask can only swap it, and a file another thread created meanwhile would get
    # the wrong mode. /proc/self/status has it since Linux 4.7; elsewhere swap it back at once.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_folder(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp(prefix=prefix, dir=parent)`` for a folder that is renamed into place when full:
    it gets ``mkdir()``'s mode rather than mkdtemp's 0700, which it would keep after the rename."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(folder_mode())
    return folder


def replace_folder(dest: Path, fill: Callable[[Path], None], *, durable: bool = False) -> None:
    """Fill a temporary folder beside ``dest`` with ``fill(folder)``, give it the usual modes, and swap it
    in for ``dest`` (replacing what is there): a reader never sees half of it, and a failed fill leaves
    ``dest`` as it was. ``durable``: every file is fsynced before the swap, the parent folder after it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_folder(dest.parent, f".{dest.name}.")
    try:
        fill(staging)
        share_tree(staging)
        if durable:
            for path in staging.rglob("*"):
                if path.is_file():
                    fsync_file(path)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        if durable:
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def share_tree(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``open()`` and ``mkdir()`` would have given, after
    writers that ignore the umask (safetensors' ``save_file``, ``save_pretrained`` through it)."""
    files, folders = file_mode(), folder_mode()
    os.chmod(root, folders)
    for parent, subfolders, names in os.walk(root):  # links to folders are listed, never entered
        for name in subfolders + names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):  # chmod would follow it out of the tree
                os.chmod(path, folders if os.path.isdir(path) else files)


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
