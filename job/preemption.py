"""Preemption: SIGTERM/SIGINT ask the job to stop; the job decides where it is safe to.

The training loop reads ``stop_requested()`` at step boundaries, checkpoints, waits for uploads within the grace
budget and exits 75; fetch and warm check at their item boundaries, where everything on disk is whole.

The budget, ``LOKR_GRACE_SECONDS`` (default 20, under Kubernetes' 30 s default grace period), runs from the
signal's delivery to the process's exit. Three things broke it (measured under load, see BENCHMARKS.md):

- Python runs a signal handler on the main thread only, between bytecodes: a main thread inside a long C call
  (a torch op, a blocking wait) saw the signal only when the call returned, so the budget started late. The
  C-level handler's wakeup byte (``signal.set_wakeup_fd``) now goes to a socket that a watcher thread reads:
  it notes the delivery at once, whatever the main thread is doing.
- The watchdog's last act, the final status write, waited for a lock that the main thread held across a
  remote status write to a slow store (16 s past a 5 s budget). What runs before the exit is now bounded.
- The watcher needs the GIL, and under CPU load threads that run Python flat out (boto3 building a client,
  s3transfer) kept it from the watcher for up to 2.5 s. The watcher's exit (final status, 75) comes a reserve
  ahead of the budget's end, and a kernel timer (SIGALRM, default action) ends the process at that end if
  the watcher still has not: a signal death, which an orchestrator retries like 75.
- After the last atexit handler the interpreter's finalisation (garbage-collecting torch's modules) took
  1.7-4 s, during which no Python thread runs, the watchdog included. After a signal the process now leaves
  with ``os._exit`` once its status is written and its log flushed (``exit_if_signalled``).

Two ways out are immediate, because what is durable is all a spot machine can count on by then: a second
signal, and the watcher when the budget is about to run out. Both write the final local status first (the
``before_exit`` callbacks) and exit 75. Local writes are atomic (temp name + rename, checkpoint markers last),
so an exit at any instant leaves nothing a later run trusts half-written: an upload still in flight is left
without its marker and is never loaded. PID 1 needs none of tini for this: the handlers are installed
explicitly, and the kernel delivers handled signals to PID 1 like any other process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from job.errors import ExitCode, TransientError
from job.settings import DEFAULT_GRACE_SECONDS, job_settings

log = logging.getLogger("lokr")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The watcher starts the exit this long before the budget ends (a quarter of a small budget): the final
# status write, the log flush and os._exit happen inside it.
_EXIT_RESERVE_S = 1.0
# The share of that reserve the final status write and the log flush may take; then os._exit regardless.
_FINAL_WORDS_SHARE = 0.75
# The watcher also looks at the clock this often: a signal whose wakeup byte it missed (another library
# took the wakeup fd) still reached the Python-level handler, and the budget must hold for it too.
_WATCH_INTERVAL_S = 0.1


class Preemption:
    """The process-wide stop request: which signal, when it was delivered, and how much grace is left."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signal_name: str | None = None
        self.signalled_at: float | None = None  # time.monotonic() of the first signal's delivery
        # Run (bounded in time) before the watcher ends the process: the final local status.
        self.before_exit: list[Callable[[str], None]] = []

    @property
    def requested(self) -> bool:
        return self.signalled_at is not None

    @property
    def reason(self) -> str:
        return f"preempted ({self.signal_name})" if self.signal_name else "preempted"

    @property
    def reserve(self) -> float:
        """Seconds kept back at the end of the budget for the exit itself."""
        return min(_EXIT_RESERVE_S, self.grace_seconds / 4)

    def remaining(self) -> float:
        """Seconds left before the watcher ends the process (the budget less the reserve, while no signal)."""
        spent = 0.0 if self.signalled_at is None else time.monotonic() - self.signalled_at
        return max(0.0, self.grace_seconds - self.reserve - spent)

    def record(self, signum: int, at: float) -> None:
        """The first signal's name and delivery time; later ones change neither."""
        if self.signalled_at is None:
            self.signal_name = signal.Signals(signum).name
            self.signalled_at = at

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler (main thread, between bytecodes): no I/O, no locks, it may interrupt
        anything. It sets the flag for the loop; the watcher has usually noted the signal already."""
        self.record(signum, time.monotonic())

    def raise_if_requested(self, where: str) -> None:
        """At an item boundary of a stage with nothing to save: stop with exit 75."""
        if self.requested:
            raise TransientError(f"{self.reason} during {where}; nothing is lost, run again to continue")

    def watch(self, wakeup: socket.socket) -> None:
        """The watcher thread: each byte on ``wakeup`` is a delivered signal's number."""
        wakeup.settimeout(_WATCH_INTERVAL_S)
        delivered, backstop = 0, False
        while _current is self:  # a later install() (tests call the CLI in-process) takes over
            try:
                received = wakeup.recv(64)
            except TimeoutError:
                received = b""
            now = time.monotonic()
            for signum in received:
                if signum not in HANDLED_SIGNALS:
                    continue
                delivered += 1
                self.record(signum, now)
                if delivered > 1:
                    name = signal.Signals(signum).name
                    self.leave(f"{self.reason}, then {name}: a second signal ends the process at once")
            if self.requested and not backstop and self.signalled_at is not None:
                # The kernel's own timer, for a watcher that does not get the GIL in time (CPU-bound threads
                # starved it for 2.5 s under load): SIGALRM's default action ends the process at the budget's
                # end, a signal death an orchestrator retries like 75.
                signal.setitimer(
                    signal.ITIMER_REAL, max(0.001, self.grace_seconds - (now - self.signalled_at))
                )
                backstop = True
            if self.requested and self.remaining() <= 0:
                self.leave(f"{self.reason}: the grace budget of {self.grace_seconds:g} s ran out")

    def leave(self, reason: str) -> NoReturn:
        """Write the final status and flush the log on a thread of their own, waiting for them at most part
        of the reserve (a store or a disk may hang), then exit 75."""

        def final_words() -> None:
            for callback in self.before_exit:
                with contextlib.suppress(Exception):  # the exit must happen whatever a callback does
                    callback(reason)
            log.error("%s; exiting 75", reason)
            flush_logs()

        writer = threading.Thread(target=final_words, name="lokr-final-status", daemon=True)
        writer.start()
        writer.join(self.reserve * _FINAL_WORDS_SHARE)
        os._exit(int(ExitCode.TRANSIENT))


def flush_logs() -> None:
    """Everything logged so far out of the process (``os._exit`` flushes no Python buffer)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


_current = Preemption(DEFAULT_GRACE_SECONDS)
# The wakeup socket pair, kept open for the process's life (the C-level handler writes to its second end).
_wakeup: tuple[socket.socket, socket.socket] | None = None


def current() -> Preemption:
    return _current


def install() -> Preemption:
    """Handle SIGTERM and SIGINT from now on (main thread only) and start the watcher."""
    global _current, _wakeup
    _current = Preemption(job_settings().grace_seconds)
    if _wakeup is None:
        _wakeup = socket.socketpair()
        _wakeup[1].setblocking(False)  # the C-level handler must never block on it
    receive, send = _wakeup
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _current.handle)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the watcher's backstop: terminate, whatever holds the GIL
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_current.watch, args=(receive,), name="lokr-signal-watcher", daemon=True).start()
    return _current


def stop_requested() -> bool:
    return _current.requested


def exit_if_signalled(code: int) -> int:
    """Return ``code`` for the interpreter to exit with; after a signal, exit with it here instead. The
    interpreter's teardown (thread joins, atexit, finalisation) took seconds that the budget does not have,
    and by now the status is written and the run's state is durable or abandoned cleanly."""
    if not _current.requested:
        return code
    flush_logs()
    os._exit(code)
