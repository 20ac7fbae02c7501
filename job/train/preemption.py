"""Preemption: SIGTERM/SIGINT ask the job to stop; the job decides where it is safe to.

The handler only records the signal (no I/O, no locks: it may interrupt anything, logging included). The
training loop reads ``stop_requested()`` at step boundaries, checkpoints, waits for uploads within the grace
budget and exits 75; fetch and warm check at their item boundaries, where everything on disk is whole.

Two ways out are immediate, because what is durable is all a spot machine can count on by then: a second
signal exits 75 in the handler itself, and a watchdog thread exits 75 once ``LOKR_GRACE_SECONDS`` (default
20, under Kubernetes' 30 s default grace period) have passed since the first signal. Local writes are atomic
(temp name + rename, checkpoint markers last), so an exit at any instant leaves nothing a later run trusts
half-written. PID 1 needs none of tini for this: the handlers are installed explicitly, and the kernel
delivers handled signals to PID 1 like any other process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from job.errors import ExitCode, TransientError

log = logging.getLogger("lokr")

GRACE_ENV = "LOKR_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 20.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How often the watchdog looks at the clock: the grace budget is kept to within this.
_WATCH_INTERVAL_S = 0.1


class Preemption:
    """The process-wide stop request: which signal, when, and how much grace is left."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signal_name: str | None = None
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self.on_deadline: list[Callable[[str], None]] = []

    @property
    def requested(self) -> bool:
        return self.signalled_at is not None

    @property
    def reason(self) -> str:
        return f"preempted ({self.signal_name})" if self.signal_name else "preempted"

    def remaining(self) -> float:
        """Seconds of the grace budget left (the whole budget while no signal has come)."""
        if self.signalled_at is None:
            return self.grace_seconds
        return max(0.0, self.grace_seconds - (time.monotonic() - self.signalled_at))

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled_at is not None:
            os._exit(int(ExitCode.TRANSIENT))  # second signal: leave now with what is durable
        self.signal_name = signal.Signals(signum).name
        self.signalled_at = time.monotonic()

    def raise_if_requested(self, where: str) -> None:
        """At an item boundary of a stage with nothing to save: stop with exit 75."""
        if self.requested:
            raise TransientError(f"{self.reason} during {where}; nothing is lost, run again to continue")

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            if self.requested and self.remaining() <= 0:
                reason = f"{self.reason}: grace budget of {self.grace_seconds:g} s ran out"
                for callback in self.on_deadline:
                    # The exit below must happen whatever a callback does.
                    with contextlib.suppress(Exception):
                        callback(reason)
                os._exit(int(ExitCode.TRANSIENT))


def grace_seconds_from_env() -> float:
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", GRACE_ENV, raw, DEFAULT_GRACE_SECONDS)
        return DEFAULT_GRACE_SECONDS
    return max(0.0, value)


_current = Preemption(DEFAULT_GRACE_SECONDS)


def current() -> Preemption:
    return _current


def install() -> Preemption:
    """Handle SIGTERM and SIGINT from now on (main thread only) and start the grace-budget watchdog."""
    global _current
    _current = Preemption(grace_seconds_from_env())
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _current.handle)
    threading.Thread(target=_current._watch, name="lokr-grace-watchdog", daemon=True).start()
    return _current


def stop_requested() -> bool:
    return _current.requested
