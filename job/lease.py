"""One trainer per run URI, one process per work directory.

**The run lease** is ``<run_uri>/lease.json``, taken with the store's own atomic primitive (S3 conditional
writes, a Hub commit with ``parent_commit``, ``O_EXCL`` locally; see ``Storage.create_exclusive`` and
``replace_if``) and renewed by a heartbeat thread. A second process waits up to ``LOKR_LEASE_WAIT_SECONDS``
for it, then exits 75 naming the holder. A holder that stops renewing (SIGKILL, a lost node) loses the
lease when its ``expires_at`` passes and the next process takes it over with the generation (the fencing
number) raised by one. Before every write to the run URI the writer calls ``fence()``: it re-reads the
lease and raises ``TransientError`` (exit 75) unless this process still holds it, so a process that lost
its lease stops writing. A clean exit (exit 75 after a signal included) marks the lease released, so a
replacement need not wait out the TTL.

The file (JSON)::

    {"holder": {"host": "pod-a", "pid": 7, "token": "<random hex>"}, "generation": 3, "command": "run",
     "acquired_at": "<ISO 8601 UTC>", "renewed_at": "…", "expires_at": "…", "ttl_seconds": 120,
     "released": false}

Expiry compares the holder's clock with the reader's: the TTL must exceed the clock skew between machines
(NTP keeps it far below a second).

The work-directory lock (``job.workdir.WorkdirLock``) is taken beside it by ``exclusive``.

Only the standard library (and the storage backends, lazily) is imported here: the CLI uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from job import distributed
from job.errors import ConfigError, JobError, TransientError
from job.settings import job_settings
from job.workdir import WorkdirLock

log = logging.getLogger("lokr")

LEASE_FILE = "lease.json"
TTL_ENV = "LOKR_LEASE_TTL_SECONDS"
WAIT_ENV = "LOKR_LEASE_WAIT_SECONDS"
HEARTBEAT_ENV = "LOKR_LEASE_HEARTBEAT_SECONDS"
DEFAULT_TTL_SECONDS = 120.0
# Every renewal on the Hub is a commit, and a repo takes about 128 an hour: renew every 200 s there.
DEFAULT_HUB_TTL_SECONDS = 600.0
# A replacement waits this much longer than one TTL by default, so it outlasts a dead holder's lease.
_WAIT_MARGIN_SECONDS = 60.0
# How often a lost race (or a commit by someone else on the Hub) is retried at once before backing off.
_SWAP_ATTEMPTS = 5


@dataclass(frozen=True)
class LeaseSettings:
    ttl: float
    heartbeat: float
    wait: float

    @property
    def poll(self) -> float:
        """How often a waiting process looks at the lease again."""
        return max(0.2, min(5.0, self.ttl / 4))

    @classmethod
    def from_env(cls, run_uri: str) -> LeaseSettings:
        default_ttl = DEFAULT_HUB_TTL_SECONDS if run_uri.startswith("hf://") else DEFAULT_TTL_SECONDS
        settings = job_settings()
        ttl = settings.lease_ttl_seconds or default_ttl
        heartbeat = settings.lease_heartbeat_seconds or ttl / 3
        wait = settings.lease_wait_seconds
        wait = ttl + _WAIT_MARGIN_SECONDS if wait is None else wait
        if not heartbeat < ttl:
            raise ConfigError(
                f"{TTL_ENV}={ttl:g} and {HEARTBEAT_ENV}={heartbeat:g}: the TTL must be positive and the "
                "heartbeat shorter than it (a third of it by default)"
            )
        return cls(ttl=ttl, heartbeat=heartbeat, wait=max(0.0, wait))


@dataclass(frozen=True)
class LeaseRecord:
    host: str
    pid: int
    token: str
    generation: int
    command: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_seconds: float
    released: bool = False

    def encode(self) -> bytes:
        value = {
            "holder": {"host": self.host, "pid": self.pid, "token": self.token},
            "generation": self.generation,
            "command": self.command,
            "acquired_at": _iso(self.acquired_at),
            "renewed_at": _iso(self.renewed_at),
            "expires_at": _iso(self.expires_at),
            "ttl_seconds": self.ttl_seconds,
            "released": self.released,
        }
        return (json.dumps(value, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for a file that is not one (e.g. cut short by a crash): free to take."""
        try:
            value = json.loads(data)
            holder = value["holder"]
            return cls(
                host=str(holder["host"]),
                pid=int(holder["pid"]),
                token=str(holder["token"]),
                generation=int(value["generation"]),
                command=str(value.get("command", "")),
                acquired_at=_unix(value["acquired_at"]),
                renewed_at=_unix(value["renewed_at"]),
                expires_at=_unix(value["expires_at"]),
                ttl_seconds=float(value["ttl_seconds"]),
                released=bool(value.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires_at

    def holder(self) -> str:
        return f"host {self.host}, pid {self.pid}"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _unix(text: Any) -> float:
    return datetime.fromisoformat(str(text)).timestamp()


class RunLease:
    """This process's claim on one run URI."""

    def __init__(self, run_uri: str, command: str, settings: LeaseSettings | None = None):
        from job.storage import join, storage_for

        self.run_uri = run_uri
        self.uri = join(run_uri, LEASE_FILE)
        self.command = command
        self.settings = settings or LeaseSettings.from_env(run_uri)
        self._storage = storage_for(self.uri)
        self.token = secrets.token_hex(16)
        self.generation = 0
        self.expires_at = 0.0
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()  # one read-and-swap at a time: heartbeat, fence and release

    # -- taking it ------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, waiting up to ``settings.wait`` seconds for a live holder; then keep it renewed."""
        from job.preemption import current as preemption

        deadline = time.monotonic() + self.settings.wait
        announced = False
        while True:
            preemption().raise_if_requested(f"the wait for the lease on {self.run_uri}")
            taken, holder = self._try_take()
            if taken:
                break
            if holder is None:
                continue  # lost a race for a free lease: look again at once
            if time.monotonic() >= deadline:
                raise TransientError(self._held_message(holder))
            if not announced:
                log.info(
                    "lease: %s is held by another process (%s; expires at %s unless renewed); waiting up "
                    "to %g s (%s)",
                    self.run_uri,
                    holder.holder(),
                    _iso(holder.expires_at),
                    self.settings.wait,
                    WAIT_ENV,
                )
                announced = True
            time.sleep(max(0.0, min(self.settings.poll, deadline - time.monotonic())))
        self._heartbeat = threading.Thread(target=self._beat, name="lokr-lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def _try_take(self) -> tuple[bool, LeaseRecord | None]:
        """(True, None) once taken; (False, holder) while someone else holds it live; (False, None) after
        losing a race for a free lease."""
        current = self._storage.read_versioned(self.uri)
        previous = LeaseRecord.decode(current.data) if current is not None else None
        now = time.time()
        if previous is not None and self._is_mine(previous, any_generation=True):
            # Our own write landed although its answer was lost (a retried conditional write says "lost").
            self._taken(previous, None)
            return True, None
        if previous is not None and previous.live(now):
            return False, previous
        mine = self._record(previous.generation + 1 if previous else 1, now, acquired_at=now)
        if current is None:
            won = self._storage.create_exclusive(self.uri, mine.encode())
        else:
            won = self._storage.replace_if(self.uri, mine.encode(), current.version)
        if won:
            self._taken(mine, previous)
        return won, None

    def _taken(self, mine: LeaseRecord, previous: LeaseRecord | None) -> None:
        self.generation, self.expires_at = mine.generation, mine.expires_at
        if previous is not None and not previous.released:
            log.info(
                "lease: took over %s from %s (its lease expired at %s); generation %d",
                self.run_uri,
                previous.holder(),
                _iso(previous.expires_at),
                mine.generation,
            )
        else:
            log.info(
                "lease: holding %s (generation %d, TTL %g s, renewed every %g s)",
                self.run_uri,
                mine.generation,
                self.settings.ttl,
                self.settings.heartbeat,
            )

    def _record(
        self, generation: int, now: float, *, acquired_at: float, released: bool = False
    ) -> LeaseRecord:
        return LeaseRecord(
            host=socket.gethostname(),
            pid=os.getpid(),
            token=self.token,
            generation=generation,
            command=self.command,
            acquired_at=acquired_at,
            renewed_at=now,
            expires_at=now if released else now + self.settings.ttl,
            ttl_seconds=self.settings.ttl,
            released=released,
        )

    def _is_mine(self, record: LeaseRecord | None, *, any_generation: bool = False) -> bool:
        return (
            record is not None
            and record.token == self.token
            and not record.released
            and (any_generation or record.generation == self.generation)
        )

    def _held_message(self, holder: LeaseRecord) -> str:
        return (
            f"run URI {self.run_uri} is held by another lokr-job process ({holder.holder()}, running "
            f"'{holder.command}' since {_iso(holder.acquired_at)}); its lease expires at "
            f"{_iso(holder.expires_at)} unless renewed. Waited {self.settings.wait:g} s ({WAIT_ENV}); exiting "
            "75 so that this job is retried later. If that process is gone, its lease lapses by itself at "
            "that time"
        )

    # -- keeping it -----------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat):
            try:
                if not self._renew():
                    return
            except Exception as exc:
                # The store is unreachable for now: keep trying while the lease is ours by its own clock.
                reason = exc.message if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
                if time.time() >= self.expires_at:
                    self._lose(f"could not renew it before it expired ({reason})")
                    return
                log.warning("lease: renewing %s failed (%s); trying again", self.run_uri, reason)

    def _renew(self) -> bool:
        """Push the expiry forward; False (and the lease recorded lost) if someone else holds it now."""
        with self._lock:
            for _ in range(_SWAP_ATTEMPTS):
                if self._stop.is_set():
                    return False
                current = self._storage.read_versioned(self.uri)
                record = LeaseRecord.decode(current.data) if current is not None else None
                if current is None or not self._is_mine(record):
                    self._lose_to(record)
                    return False
                assert record is not None
                renewed = self._record(self.generation, time.time(), acquired_at=record.acquired_at)
                if self._storage.replace_if(self.uri, renewed.encode(), current.version):
                    self.expires_at = renewed.expires_at
                    return True
                # Changed since the read: another holder, or (on the Hub) any commit; read again.
        raise TransientError(f"the lease on {self.run_uri} kept changing while being renewed")

    def check(self, what: str) -> None:
        """Fencing: raise ``TransientError`` unless this process still holds the lease (read from the store)."""
        with self._lock:
            if self.lost_reason is None:
                current = self._storage.read_versioned(self.uri)
                record = LeaseRecord.decode(current.data) if current is not None else None
                if not self._is_mine(record):
                    self._lose_to(record)
        if self.lost_reason is not None:
            raise TransientError(f"not writing {what}: {self.lost_reason}")

    def _lose_to(self, record: LeaseRecord | None) -> None:
        if record is None:
            self._lose("its lease file is gone")
        elif record.released:
            self._lose(f"its lease was released by {record.holder()}")
        else:
            self._lose(f"{record.holder()} took it over (generation {record.generation})")

    def _lose(self, why: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = (
                f"this process lost the lease on {self.run_uri}: {why}; it stopped writing there. Exit 75: "
                "another process continues this run"
            )
            log.warning("lease: %s", self.lost_reason)
        self._stop.set()

    # -- giving it back -------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and mark the lease released (best effort: left alone it lapses after its TTL)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self.settings.heartbeat)
        if self.lost_reason is not None:
            return
        try:
            with self._lock:
                for _ in range(_SWAP_ATTEMPTS):
                    current = self._storage.read_versioned(self.uri)
                    record = LeaseRecord.decode(current.data) if current is not None else None
                    if current is None or not self._is_mine(record):
                        return
                    assert record is not None
                    done = self._record(
                        self.generation, time.time(), acquired_at=record.acquired_at, released=True
                    )
                    if self._storage.replace_if(self.uri, done.encode(), current.version):
                        log.debug("lease: released %s", self.run_uri)
                        return
        except Exception as exc:
            log.warning(
                "lease: could not release %s (%s); it lapses by itself at %s",
                self.run_uri,
                exc.message if isinstance(exc, JobError) else exc,
                _iso(self.expires_at),
            )


class RunGuard:
    """What ``exclusive`` hands the command: ``take()`` the run lease once the preflight has passed."""

    def __init__(self, run_uri: str | None, command: str):
        self.run_uri = run_uri
        self.command = command
        self.lease: RunLease | None = None  # held here (global rank 0, the only writer of the run URI)

    def take(self) -> None:
        """Wait for (or take over) the run lease; every rank fails alike if rank 0 cannot get it."""
        if not self.run_uri:
            return
        candidate = RunLease(self.run_uri, self.command)
        distributed.once(candidate.acquire)
        if candidate.generation:
            self.lease = candidate


# The guard of the command in progress, on the process that writes the run URI (None elsewhere).
_guard: RunGuard | None = None


def fence(what: str) -> None:
    """Before a write to the run URI: ``TransientError`` unless this process holds its lease (re-read from
    the store). A no-op in a process that needs none (no run URI, or not the rank that writes)."""
    if _guard is None:
        return
    if _guard.lease is None:
        raise TransientError(f"not writing {what}: this process does not hold the lease on {_guard.run_uri}")
    _guard.lease.check(what)


def may_write() -> bool:
    """Whether this process may write its run URI now: it needs no lease, or holds one it has not lost.
    Status writes ask first, so a process still waiting for the lease never overwrites the holder's."""
    return _guard is None or (_guard.lease is not None and _guard.lease.lost_reason is None)


def lost() -> bool:
    """Whether this process held the run lease and lost it (the training loop then stops at the next step)."""
    return _guard is not None and _guard.lease is not None and _guard.lease.lost_reason is not None


@contextlib.contextmanager
def exclusive(workdir: str | Path, run_uri: str | None, command: str) -> Iterator[RunGuard]:
    """Around a stage command: the work-directory lock (each machine's first process) at once, and the run
    lease when the command calls ``take()`` (after its preflight, so a malformed or unwritable run URI is
    reported as such). A lease lost on the way ends the command with ``TransientError`` naming the new
    holder, whatever the stage raised."""
    global _guard
    lock = WorkdirLock(Path(workdir).expanduser())
    guard = RunGuard(run_uri, command)
    try:
        distributed.once_per_machine(lock.acquire)
        if run_uri and os.environ.get("RANK", "0") == "0":
            _guard = guard
        try:
            yield guard
        except JobError as exc:
            if lost():
                raise TransientError(_lost_reason(guard)) from exc
            raise
        if lost():
            raise TransientError(_lost_reason(guard))
    finally:
        _guard = None
        if guard.lease is not None:
            guard.lease.release()
        lock.release()


def _lost_reason(guard: RunGuard) -> str:
    assert guard.lease is not None and guard.lease.lost_reason is not None
    return guard.lease.lost_reason
