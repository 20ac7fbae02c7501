"""The operating system's refusals the user can act on, as exit codes (``job.cli`` maps them in one place).

- A full disk (ENOSPC, EDQUOT) is ``TransientError`` (75): another node may have the room. The message
  names the path, the bytes that were being written when known, and what fills the work directory.
- A read-only file system or a forbidden path (EROFS, EACCES, EPERM) is ``PermissionDeniedError`` (4),
  naming the path: the work directory must be writable and every input readable.

The failure may be the exception raised or anywhere in its chain (``__cause__``/``__context__``, the members
of an ``ExceptionGroup``): a wrapper, or a worker thread's future re-raised on the main thread, keeps it
there. Rust extensions (safetensors, tokenizers) raise their own types whose text ends in ``(os error N)``;
those count too. Only the standard library is imported: ``job.cli`` imports this at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from job.errors import JobError, PermissionDeniedError, TransientError

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
# Rust's io::Error as safetensors and tokenizers print it: "No space left on device (os error 28)".
_RUST_IO = re.compile(r"\(os error (\d+)\)")
# The work directory's folders (job.workdir.WorkDir), the usual suspects when its disk fills up.
_WORKDIR_FOLDERS = ("cache", "data", "checkpoints", "models", "offload", "output")
_PATH_NOTE = "lokr: while writing "
_SIZE_NOTE = "lokr: bytes being written: "


@contextlib.contextmanager
def writing(path: str | Path, size: int | None = None) -> Iterator[None]:
    """Around a write: a full disk or a refusal inside names ``path`` (and ``size``, when known), even where
    the library that failed did not say which file it was writing."""
    try:
        yield
    except Exception as exc:
        if _errno(exc) in _FULL | _DENIED and not _noted(exc, _PATH_NOTE):
            exc.add_note(f"{_PATH_NOTE}{path}")
            if size is not None:
                exc.add_note(f"{_SIZE_NOTE}{size}")
        raise


@dataclass(frozen=True)
class _Failure:
    errno: int
    path: str | None
    strerror: str
    size: int | None


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = _RUST_IO.search(str(exc))
    return int(found.group(1)) if found else None


def _noted(exc: BaseException, prefix: str) -> str | None:
    return next((n[len(prefix) :] for n in getattr(exc, "__notes__", ()) if n.startswith(prefix)), None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
        if isinstance(current, BaseExceptionGroup):
            todo += list(current.exceptions)


def failure_in(exc: BaseException) -> _Failure | None:
    """The root full-disk or permission failure in ``exc``'s chain (the deepest: later ones, such as a
    status file that could not be written either, are consequences)."""
    found = [e for e in _chain(exc) if _errno(e) in _FULL | _DENIED]
    if not found:
        return None
    root = found[-1]
    code = _errno(root) or 0
    filename = getattr(root, "filename", None) or _noted(root, _PATH_NOTE)
    size = _noted(root, _SIZE_NOTE)
    return _Failure(code, str(filename) if filename else None, os.strerror(code), int(size) if size else None)


def map_os_error(exc: BaseException, workdir: str | Path | None) -> JobError | None:
    """The ``JobError`` for a full disk or a refused path in ``exc``'s chain; None for anything else."""
    failure = failure_in(exc)
    if failure is None:
        return None
    path = failure.path or "(a file the system did not name)"
    code = errno.errorcode.get(failure.errno, str(failure.errno))
    root = Path(workdir).expanduser().resolve() if workdir else None
    if failure.errno in _FULL:
        wanted = f" ({human_size(failure.size)} being written)" if failure.size is not None else ""
        return TransientError(
            f"disk full ({code}) writing {path}{wanted}; {_disk_report(root, failure.path)}; "
            "run again on a node with more free disk (exit 75: transient)"
        )
    if root is not None and (failure.path is None or _is_under(Path(failure.path), root)):
        return PermissionDeniedError(
            f"the work directory {root} is not writable ({code}: {failure.strerror}) at {path}: "
            f"mount it read-write and writable by uid {os.getuid()}, or pass another --workdir"
        )
    return PermissionDeniedError(
        f"cannot access {path} ({code}: {failure.strerror}): make it readable (and its folders "
        f"searchable) by uid {os.getuid()}, or point the config at a copy this process can read"
    )


def _is_under(path: Path, root: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _disk_report(workdir: Path | None, filename: str | None) -> str:
    """Free space of the file system that filled, and the work directory's largest folders."""
    probe = nearest_existing(Path(filename) if filename else workdir or Path.cwd())
    try:
        usage = shutil.disk_usage(probe)
        text = f"{human_size(usage.free)} free of {human_size(usage.total)} on the file system of {probe}"
    except OSError:
        text = f"free space of {probe} unknown"
    if workdir is not None and workdir.is_dir():
        sizes = sorted(((name, tree_size(workdir / name)) for name in _WORKDIR_FOLDERS), key=lambda x: -x[1])
        largest = ", ".join(f"{name}/ {human_size(size)}" for name, size in sizes if size)
        text += f"; in the work directory {workdir}: {largest or 'nothing yet'}"
    return text


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists (the file system a folder not made yet will live on)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue  # removed while we counted: the report is a guide, not an audit
    return total


def human_size(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
