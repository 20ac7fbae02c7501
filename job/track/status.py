"""``status.json``: where the run is, for people and orchestrators, locally and at ``<run_uri>/status.json``.

Updated at phase changes, at checkpoints and at exit; written atomically (temp name + rename) so a reader
never sees half a file. Every string passes ``redact`` (a run URI or an error may carry a credential).
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
from job.track.redact import redact

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
        self._lock = threading.Lock()
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
        self.update(remote=remote, phase="exited" if code else "done", exit_reason=reason, exit_code=code)

    def update(self, *, remote: bool = True, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self.status, key, redact(value) if isinstance(value, str) else value)
            self.status.updated_at = _now()
            data = (json.dumps(asdict(self.status), indent=1) + "\n").encode()
            self._write_local(data)
            if remote and (not self.remote_at_exit_only or self.status.exit_code is not None):
                self._write_remote(data)

    def _write_local(self, data: bytes) -> None:
        write_bytes_atomic(self.local_path, data)

    def _write_remote(self, data: bytes) -> None:
        if self.remote_uri is None:
            return
        from job.storage import storage_for

        try:
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
    """Around a stage command: status.json from start to exit, with the exit's reason and code. The grace
    watchdog writes the local copy too if it has to end the process."""
    from job.errors import ExitCode, JobError
    from job.train import preemption

    if int(os.environ.get("RANK", "0")) != 0:
        # One writer per run: the other processes of a multi-process job report nothing.
        yield None
        return
    reporter = StatusReporter(workdir_status, run_uri)
    activate(reporter)
    preemption.current().on_deadline.append(lambda reason: reporter.finish(reason, 75, remote=False))
    reporter.phase(command)
    try:
        yield reporter
    except BaseException as exc:
        if isinstance(exc, JobError):
            code, reason = int(exc.exit_code), exc.message
        elif isinstance(exc, KeyboardInterrupt):
            code, reason = int(ExitCode.TRANSIENT), "interrupted"
        else:
            code, reason = int(ExitCode.BUG), f"bug: {type(exc).__name__}: {exc}"
        if preemption.stop_requested():
            reason = f"{preemption.current().reason}: {reason}"
        reporter.finish(reason, code)
        raise
    else:
        reporter.finish("finished" if command in ("run", "publish") else f"{command} finished", 0)
    finally:
        activate(None)
