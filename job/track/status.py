"""``status.json``: where the run is, for people and orchestrators, locally and at ``<run_uri>/status.json``.

Updated at phase changes, at checkpoints and at exit; written atomically (temp name + rename) so a reader
never sees half a file, except on a full disk, where the file is rewritten in place so it still ends final. Every string passes ``redact`` (a run URI or an error may carry a credential).
The remote copy is best effort: a status upload that fails is logged, never fatal. A local run URI (a
plain path) gets its copy too; on the Hub it is written at exit only (each write is a commit).

Fields: ``phase``, ``step``, ``max_steps``, ``last_checkpoint`` (newest complete local one),
``last_remote_checkpoint`` (newest one whose upload finished), ``seconds_per_step``, ``eta_seconds``,
``started_at``/``updated_at`` (ISO 8601 UTC), ``host``, ``pid``, ``exit_reason``, ``exit_code``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from job.files import write_bytes_atomic
from job.redact import redact

log = logging.getLogger("lokr")

STATUS_FILE = "status.json"


@dataclass
class RunStatus:
    phase: str = "starting"
    step: int | None = None
    max_steps: int | None = None
    last_checkpoint: str | None = None
    last_remote_checkpoint: str | None = None
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    started_at: str = ""
    updated_at: str = ""
    host: str = ""
    pid: int = 0
    exit_reason: str | None = None
    exit_code: int | None = None


class StatusReporter:
    """Keeps one ``RunStatus`` and writes it out on every change. Thread-safe: checkpoint uploads report
    from their own thread."""

    def __init__(self, local_path: Path, run_uri: str | None):
        self.local_path = local_path
        self.remote_uri = f"{run_uri.rstrip('/')}/{STATUS_FILE}" if run_uri else None
        # Every Hub write is a commit (128 an hour per repo): there, the remote copy is written at exit only.
        self.remote_at_exit_only = bool(run_uri) and run_uri.startswith("hf://")
        now = _now()
        self.status = RunStatus(started_at=now, updated_at=now, host=socket.gethostname(), pid=os.getpid())
        self._lock = threading.Lock()  # held for local writes only: they are quick, and the exit needs them
        self._remote_lock = threading.Lock()  # one remote write at a time, the newest snapshot winning
        self._version = 0  # snapshots taken so far
        self._remote_version = 0  # the newest snapshot sent to the run URI
        self._checkpoint_clock: tuple[int, float] | None = None  # (step, monotonic time) at the last one

    def phase(self, name: str) -> None:
        self.update(phase=name)

    def checkpoint(self, name: str, step: int, max_steps: int | None, *, remote: bool = True) -> None:
        """A local checkpoint completed: its step, and s/step and ETA measured between checkpoints."""
        now = time.monotonic()
        changes: dict[str, Any] = {"last_checkpoint": name, "step": step}
        if max_steps is not None:
            changes["max_steps"] = max_steps
        previous = self._checkpoint_clock
        if previous is not None and step > previous[0]:
            per_step = (now - previous[1]) / (step - previous[0])
            changes["seconds_per_step"] = round(per_step, 4)
            if max_steps is not None:
                changes["eta_seconds"] = round(per_step * max(0, max_steps - step), 1)
        self._checkpoint_clock = (step, now)
        self.update(remote=remote, **changes)

    def finish(self, reason: str, code: int, *, remote: bool = True) -> None:
        """The final state. Never raises: the exit code reaches the orchestrator anyway, and a status that
        cannot be written at all is said so in the log."""
        try:
            self.update(remote=remote, phase="exited" if code else "done", exit_reason=reason, exit_code=code)
        except OSError as exc:
            log.error(
                "status: could not write the final status (exit %d) to %s: %s", code, self.local_path, exc
            )

    def update(self, *, remote: bool = True, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self.status, key, redact(value) if isinstance(value, str) else value)
            self.status.updated_at = _now()
            data = (json.dumps(asdict(self.status), indent=1) + "\n").encode()
            self._version += 1
            version = self._version
            self._write_local(data)
            send = remote and (not self.remote_at_exit_only or self.status.exit_code is not None)
        if send:
            # Outside the status lock: a remote write that hangs on a slow store once held up the final
            # local write of the grace watchdog (and so the exit) by its whole retry budget.
            with self._remote_lock:
                if version > self._remote_version:  # an older snapshot never overwrites a newer one
                    self._remote_version = version
                    self._write_remote(data)

    def _write_local(self, data: bytes) -> None:
        try:
            write_bytes_atomic(self.local_path, data)
        except OSError:
            if not self.local_path.is_file():
                raise
            # A full disk refuses the temporary file, but the status file there already has its blocks (a
            # status is far under one): rewrite it in place, so that it still ends in a final state. A reader
            # may catch this one write half-done; the next atomic write makes it whole again.
            with open(self.local_path, "r+b") as handle:
                handle.write(data)
                handle.truncate()

    def _write_remote(self, data: bytes) -> None:
        if self.remote_uri is None:
            return
        from job.lease import fence, may_write
        from job.storage import storage_for

        if not may_write():
            return  # the run lease is not (or no longer) ours: the run URI's status belongs to its holder
        try:
            fence("status.json")
            storage_for(self.remote_uri).write_bytes(self.remote_uri, data, commit_message="lokr-job: status")
        except Exception as exc:  # status is informative; it must never end the run
            log.warning("status: could not write %s: %s", redact(self.remote_uri), redact(str(exc)))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


_active: StatusReporter | None = None


def activate(reporter: StatusReporter | None) -> None:
    """Make ``reporter`` the process's status (the CLI does, for the stages to report into)."""
    global _active
    _active = reporter


def active() -> StatusReporter | None:
    return _active


def report_phase(name: str) -> None:
    if _active is not None:
        _active.phase(name)


@contextmanager
def reporting(workdir_status: Path, run_uri: str | None, command: str) -> Iterator[StatusReporter | None]:
    """Around a stage command: status.json from start to exit, with the exit's reason and the code the CLI
    exits with. If the grace watchdog or a second signal has to end the process, the local copy is made
    final first."""
    from job import preemption

    if int(os.environ.get("RANK", "0")) != 0:
        # One writer per run: the other processes of a multi-process job report nothing.
        yield None
        return
    reporter = StatusReporter(workdir_status, run_uri)
    activate(reporter)
    # Local only: the watchdog's last act must not wait on a store.
    preemption.current().before_exit.append(lambda reason: reporter.finish(reason, 75, remote=False))
    reporter.phase(command)
    try:
        yield reporter
    except BaseException as exc:
        code, reason = _exit_of(exc, workdir_status.parent)
        if preemption.stop_requested():
            reason = f"{preemption.current().reason}: {reason}"
        reporter.finish(reason, code)
        raise
    else:
        reporter.finish("finished" if command in ("run", "publish") else f"{command} finished", 0)
    finally:
        activate(None)


def _exit_of(exc: BaseException, workdir: Path) -> tuple[int, str]:
    """The exit code and reason ``job.cli`` gives ``exc``, so that status.json says what the process did."""
    from job.errors import ExitCode, JobError
    from job.oserrors import map_os_error

    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.TRANSIENT), "interrupted"
    mapped = exc if isinstance(exc, JobError) else map_os_error(exc, workdir)
    if mapped is not None:
        return int(mapped.exit_code), mapped.message
    return int(ExitCode.BUG), f"bug: {type(exc).__name__}: {exc}"
