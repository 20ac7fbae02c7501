"""Checkpoints at the run URI: background upload, remote rotation, and resuming from the remote ``latest``.

Layout: ``<run_uri>/checkpoints/checkpoint-<step:08d>/…`` with the same ``COMPLETE`` marker as the local copy.
On S3 the marker is uploaded after every other file, so a folder with a marker is whole; on the Hub a
checkpoint is one commit (atomic), and commits are spaced by ``HUB_MIN_COMMIT_INTERVAL_S`` so a run stays far
under the Hub's 128 commits an hour: a checkpoint that comes sooner waits, and a newer one replaces it.

Uploads run on one thread so training never waits; each works from hard links of the checkpoint's files, so
local rotation may delete the folder meanwhile. A downloaded remote checkpoint is verified against its marker
(sizes and sha256) before it is renamed into place; one that fails is skipped, never loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job import distributed
from job.config.schema import JobConfig
from job.files import make_temp_folder
from job.lease import fence
from job.preemption import current as current_preemption
from job.redact import redact
from job.storage import join, parse_uri, storage_for
from job.track.status import StatusReporter, active
from job.train.checkpoint import (
    MARKER,
    checkpoint_name,
    checkpoint_step,
    latest_complete,
    verify,
)
from job.train.checkpointer import CheckpointHook

log = logging.getLogger("lokr")

CHECKPOINTS = "checkpoints"
# 3600 / 72 = 50 checkpoint commits an hour at most, plus their rotations: under the Hub's 128.
HUB_MIN_COMMIT_INTERVAL_S = 72.0
# Kept back from the grace budget for writing status and exiting after the last upload.
_EXIT_MARGIN_S = 1.0
_STAGING_PREFIX = ".upload-"


def remote_root(run_uri: str) -> str:
    return join(run_uri, CHECKPOINTS)


def remote_checkpoints(run_uri: str) -> dict[int, bool]:
    """Step → whether its marker is there, for every ``checkpoint-<step>`` folder under the run URI."""
    found: dict[int, bool] = {}
    for info in storage_for(run_uri).list(remote_root(run_uri)):
        folder, _, rest = info.key.partition("/")
        step = checkpoint_step(Path(folder))
        if step is not None and rest:
            found[step] = found.get(step, False) or rest == MARKER
    return found


def set_aside_remote(run_uri: str, local_aside: Path, step: int) -> None:
    """A checkpoint that failed to load here, already set aside locally as ``local_aside``: when the run URI
    holds the same one (the same marker, so the same bytes), move it aside there too, so that no machine
    downloads it again. The store has no rename: the local copy goes up under the set-aside name (outside
    the ``checkpoint-<step>`` names, like the local one, and kept for inspection), then the original goes."""
    storage = storage_for(run_uri)
    original = join(remote_root(run_uri), checkpoint_name(step))
    marker = join(original, MARKER)
    if storage.stat(marker) is None or storage.read_bytes(marker) != (local_aside / MARKER).read_bytes():
        return  # not there, or another copy: that one gets its own chance to load
    fence(f"setting aside checkpoint {checkpoint_name(step)}")
    aside = join(remote_root(run_uri), local_aside.name)
    storage.upload_folder(
        local_aside, aside, commit_message=f"lokr-job: set aside {local_aside.name}", progress=False
    )
    storage.delete(marker)  # first: a reader never finds the original complete while it is being deleted
    storage.delete(original)
    log.warning("remote checkpoint %s set aside as %s", checkpoint_name(step), redact(aside))


def download_newer_checkpoint(run_uri: str, local_root: Path) -> Path | None:
    """Bring the newest complete remote checkpoint into ``local_root`` when it is newer than every complete
    local one (a fresh machine, or a local disk that fell behind). Return it, or None when local is current.
    One that then fails to load is moved aside on both sides (``set_aside_remote``), so it is never fetched
    again: remembering it locally would not reach the next machine."""
    local = latest_complete(local_root)
    local_step = checkpoint_step(local) if local is not None else -1
    storage = storage_for(run_uri)
    candidates = sorted((s for s, complete in remote_checkpoints(run_uri).items() if complete), reverse=True)
    for step in candidates:
        if step <= local_step:
            return None
        name = checkpoint_name(step)
        local_root.mkdir(parents=True, exist_ok=True)
        temp = make_temp_folder(local_root, f".checkpoint-{step:08d}.remote.")
        try:
            storage.download_prefix(join(remote_root(run_uri), name), temp, progress=False)
            manifest = temp / ".lokr-manifest.json"
            manifest.unlink(missing_ok=True)
            problem = verify(temp)
            if problem is not None:
                log.warning("remote checkpoint %s is not usable: %s; trying the one before", name, problem)
                continue
            final = local_root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
            log.info("resume: downloaded %s from %s", name, redact(remote_root(run_uri)))
            return final
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return None


def rotate_remote(run_uri: str, limit: int | None, *, incoming: bool = False) -> None:
    """Keep the newest ``limit`` complete remote checkpoints; drop older ones and older markerless leftovers.
    Nothing newer than the newest complete one is touched (it may still be uploading).

    ``incoming``: a new checkpoint's files are up and its marker is next: make room for it first, so the
    run URI never holds more than ``limit`` complete ones, but never delete the newest complete one.
    """
    found = remote_checkpoints(run_uri)
    complete = sorted(step for step, has_marker in found.items() if has_marker)
    if not complete:
        return
    count = max(1, limit - 1) if limit and incoming else limit
    keep = set(complete[-count:]) if count else set(complete)
    storage = storage_for(run_uri)
    for step in sorted(found):
        if step < complete[-1] and step not in keep:
            log.info(
                "removing remote checkpoint %s (checkpoints_total_limit=%s)", checkpoint_name(step), limit
            )
            storage.delete(join(remote_root(run_uri), checkpoint_name(step)))


class CheckpointUploader:
    """Uploads finished checkpoints on a background thread, newest first when it falls behind."""

    def __init__(
        self,
        run_uri: str,
        *,
        total_limit: int | None,
        status: StatusReporter | None = None,
    ):
        self.run_uri = run_uri
        self.total_limit = total_limit
        self.status = status
        self.is_hub = parse_uri(run_uri).scheme == "hf"
        self._pending: tuple[Path, int] | None = None  # a staged checkpoint not yet uploaded
        self._busy = False
        self._closing = False
        self._last_commit = -float("inf")
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lokr-checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path, step: int) -> None:
        """The checkpoint hook: stage hard links now (cheap), upload later."""
        staging = _stage(path, step)
        with self._cond:
            if self._pending is not None:
                shutil.rmtree(self._pending[0], ignore_errors=True)  # superseded before it was uploaded
            self._pending = (staging, step)
            self._cond.notify_all()

    def close(self, timeout: float | None) -> bool:
        """Finish the pending upload (waiting at most ``timeout`` seconds); True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning("checkpoint upload still running when the time to wait for it ran out")
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None or not self._may_commit():
                    wait = None if self._pending is None else self._commit_wait()
                    self._cond.wait(wait)
                staging, step = self._pending
                self._pending = None
                self._busy = True
            try:
                self._upload(staging, step)
            except Exception as exc:  # a failed upload is retried by the next checkpoint
                log.warning("checkpoint %s: upload failed: %s", checkpoint_name(step), redact(str(exc)))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _commit_wait(self) -> float:
        return max(0.0, self._last_commit + HUB_MIN_COMMIT_INTERVAL_S - time.monotonic())

    def _may_commit(self) -> bool:
        return not self.is_hub or self._closing or self._commit_wait() <= 0

    def _upload(self, staging: Path, step: int) -> None:
        started = time.perf_counter()
        name = checkpoint_name(step)
        target = join(remote_root(self.run_uri), name)
        storage = storage_for(self.run_uri)
        marker = staging / MARKER
        fence(f"checkpoint {name}")  # a process that lost the run lease uploads nothing more
        if self.is_hub:
            storage.upload_folder(staging, target, commit_message=f"lokr-job: {name}", progress=False)
        else:
            # Everything but the marker, then the marker: a remote folder with a marker is whole.
            held = staging.with_name(staging.name + "." + MARKER)
            os.replace(marker, held)
            storage.upload_folder(staging, target, progress=False)
            fence(f"the marker of checkpoint {name}")  # still ours after a long upload?
            rotate_remote(self.run_uri, self.total_limit, incoming=True)
            storage.upload_file(held, join(target, MARKER))
            held.unlink()
        self._last_commit = time.monotonic()
        rotate_remote(self.run_uri, self.total_limit)
        log.info(
            "checkpoint %s uploaded to %s in %.1f s", name, redact(target), time.perf_counter() - started
        )
        if self.status is not None:
            self.status.update(last_remote_checkpoint=name)


def _stage(path: Path, step: int) -> Path:
    """Hard links to the checkpoint's files beside it (copies where links are refused)."""
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{step:08d}.", dir=path.parent))
    for source in path.rglob("*"):
        if source.is_file():
            target = staging / source.relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    return staging


def _status_hook(status: StatusReporter, max_steps: int | None, *, remote: bool) -> CheckpointHook:
    def hook(path: Path, step: int) -> None:
        # With a run URI the uploader writes the remote status once the checkpoint is there: training
        # does not wait on a status upload.
        status.checkpoint(path.name, step, max_steps, remote=remote)

    return hook


@contextmanager
def durable_checkpoints(job: JobConfig, root: Path, run_uri: str | None) -> Iterator[list[CheckpointHook]]:
    """Around the train stage: fetch a newer checkpoint from ``run_uri`` into ``root`` first, then yield
    the checkpoint hooks (status, background upload). On the way out wait for the last upload: without
    limit after a finished run, within what is left of the grace budget after a preemption."""
    for stale in root.glob(f"{_STAGING_PREFIX}*") if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    status = active()
    hooks: list[CheckpointHook] = []
    if status is not None:
        hooks.append(_status_hook(status, job.max_train_steps, remote=not run_uri))
    uploader: CheckpointUploader | None = None
    if run_uri:
        if job.resume_from_checkpoint == "latest":
            remote = run_uri
            # Each machine's first process downloads; its other processes wait and then read it locally.
            distributed.once_per_machine(lambda: download_newer_checkpoint(remote, root))
        uploader = CheckpointUploader(run_uri, total_limit=job.checkpoints_total_limit, status=status)
        hooks.append(uploader.submit)
    try:
        yield hooks
    finally:
        if uploader is not None:
            preemption = current_preemption()
            timeout = preemption.remaining() - _EXIT_MARGIN_S if preemption.requested else None
            uploader.close(timeout)
