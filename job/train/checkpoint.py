"""Checkpoint folders: atomic writes, the ``COMPLETE`` marker, finding ``latest``, rotation.

A checkpoint is written into a hidden temporary folder, every file fsynced, the marker (each file's size and
sha256) written last, then the folder renamed into place. A folder whose marker is missing or does not match
its files is never loaded: ``latest`` warns and falls back to the previous complete one. A complete one whose
contents fail to load is renamed aside (``set_aside``) by the resume, which then tries the one before.
What goes *into* a checkpoint is ``state.py``'s business; this module only needs a writer callback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from job.errors import ConfigError
from job.files import fsync_dir, fsync_file, sha256_file, share_tree

log = logging.getLogger("lokr")

MARKER = "COMPLETE"
MARKER_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMP_PREFIX = ".checkpoint-"
UNLOADABLE_SUFFIX = ".unloadable-"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def write_checkpoint(root: Path, step: int, write_contents: Callable[[Path], None]) -> Path:
    """Create ``root/checkpoint-<step>`` atomically: contents, then fsync, then the marker, then rename."""
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{step:08d}.", dir=root))
    try:
        write_contents(temp)
        return seal_checkpoint(root, step, temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def shared_staging_folder(root: Path, step: int) -> Path:
    """The temporary folder that every process writes its part of step ``step``'s checkpoint into (ZeRO
    shards); a name all processes agree on without talking, hidden from ``latest`` like any temp folder."""
    return root / f"{_TEMP_PREFIX}{step:08d}.shared"


def seal_checkpoint(root: Path, step: int, temp: Path) -> Path:
    """Marker, then rename the filled ``temp`` folder to ``root/checkpoint-<step>``; return that path."""
    final = root / checkpoint_name(step)
    # mkdtemp's 0700 and safetensors' 0600 would keep a checkpoint from anyone but its writer (the image's
    # user, when root wrote it; the next machine, when a local run URI copies the modes).
    share_tree(temp)
    write_marker(temp, step)
    if final.exists():
        # An incomplete or stale folder of the same step (e.g. from before a crash) gives way.
        shutil.rmtree(final)
    os.replace(temp, final)
    fsync_dir(root)
    return final


def write_marker(folder: Path, step: int) -> None:
    """fsync every file, then write the marker listing them (size, sha256) and fsync it too."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        fsync_file(path)
        files[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    marker = folder / MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"format": MARKER_FORMAT, "step": step, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(folder)


def verify(folder: Path, *, hashes: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is (``hashes=False``: sizes only)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER} marker (it was still being written, or was cut short)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER} marker ({exc})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, the marker says {expected['size']}"
        if hashes and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the marker"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint whose marker matches its files; incomplete ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable: %s; falling back to the one before", path, problem)
    return None


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename a complete checkpoint that failed to load to ``<name>.unloadable-<UTC time>``: kept for
    inspection, and no longer a ``checkpoint-<step>`` name, so neither ``latest`` nor rotation sees it again.
    Return the new path, or None when another process (sharing the folder) moved it first."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = path.with_name(f"{path.name}{UNLOADABLE_SUFFIX}{stamp}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    log.warning("checkpoint %s cannot be loaded: %s; set aside as %s", path.name, reason, aside.name)
    return aside


def resolve_resume(root: Path, setting: str | None) -> Path | None:
    """``resume_from_checkpoint``: None (start fresh), ``latest``, a step number, or a checkpoint folder."""
    if setting is None:
        return None
    if setting == "latest":
        return latest_complete(root)
    step = setting.removeprefix("checkpoint-")
    path = root / checkpoint_name(int(step)) if step.isdigit() else Path(setting).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"resume_from_checkpoint: {setting!r} is not a checkpoint folder ({path} does not exist); use "
            "'latest', a step number that has a checkpoint, a path, or 'none'"
        )
    problem = verify(path)
    if problem is not None:
        raise ConfigError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint: {problem}; use 'latest' to take the "
            "newest complete one"
        )
    return path


def rotate(root: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` complete checkpoints; drop older ones, broken ones and stale temp folders.

    The newest complete checkpoint is never deleted, and nothing newer than it is touched (it may be a
    checkpoint another process is still writing).
    """
    newest = latest_complete(root)
    if newest is None:
        return
    newest_step = checkpoint_step(newest)
    complete = [
        path
        for step, path in list_checkpoints(root)
        if step <= newest_step and verify(path, hashes=False) is None
    ]
    keep = set(complete[-limit:]) if limit else set(complete)
    keep.add(newest)
    for step, path in list_checkpoints(root):
        if step < newest_step and path not in keep:
            log.info("removing checkpoint %s (checkpoints_total_limit=%s)", path.name, limit)
            shutil.rmtree(path, ignore_errors=True)
    for temp in root.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(temp, ignore_errors=True)
