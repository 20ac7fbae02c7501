"""The supervisor: runs rows in worker processes and holds each row to its time budget.

A row that runs past its budget, or whose worker dies (a CUDA error, the kernel's OOM killer), is killed and
reported with what its events said so far; the remaining rows go to a fresh worker. The supervisor never
touches CUDA itself: the GPU's memory is the rows' alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EVENT_PREFIX = "@gpu_check "  # starts each event line a worker writes (gpu_check.worker.emit)
_STDERR_TAIL = 20


@dataclass
class Worker:
    """One worker process and the lines it writes, read on threads so that waiting can time out."""

    process: subprocess.Popen[str]
    events: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_TAIL))
    readers: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, command: list[str], env: dict[str, str], cwd: Path) -> Worker:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            # Its own process group: a kill reaches whatever it started (compile workers, prefetch).
            start_new_session=True,
        )
        worker = cls(process)
        worker.readers = [
            threading.Thread(target=worker._read_stdout, args=(process.stdout,), daemon=True),
            threading.Thread(target=worker._read_stderr, args=(process.stderr,), daemon=True),
        ]
        for reader in worker.readers:
            reader.start()
        return worker

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX) :]))
            else:
                sys.stderr.write(f"    | {line}")
        self.events.put(None)  # the worker's stdout closed: it is gone

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stderr.write(f"    | {line}")
            if line.strip():
                self.stderr_tail.append(line.strip())

    def next_event(self, deadline: float) -> dict[str, Any] | None:
        """The next event; None when the worker ended; TimeoutError past ``deadline`` (monotonic)."""
        try:
            return self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def death(self) -> str:
        """Why the worker ended, for a row it never reported."""
        code = self.process.wait()
        self.readers[1].join(timeout=5)  # its last words may still be in the pipe
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = self.stderr_tail[-1] if self.stderr_tail else "no output"
        return f"the worker died ({how}): {last}"


@dataclass
class RowProgress:
    """What the events of one row said, so a row cut short is reported with what it reached."""

    key: str
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    steps: list[float] = field(default_factory=list)
    warmup_steps: int = 0

    @property
    def deadline(self) -> float:
        return self.started + self.budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def partial(self, status: str, reason: str) -> dict[str, Any]:
        measured = sorted(self.steps)
        return {
            "key": self.key,
            "status": status,
            "reason": reason,
            "step_times": self.steps,
            # A median of what was measured, flagged by the status: a slow row's pace is still a finding.
            "step_s": measured[len(measured) // 2] if measured else None,
            "row_s": self.elapsed(),
        }


class Supervisor:
    """Runs rows in workers; ``budget(key)`` gives each row its seconds when it starts (0: not run)."""

    def __init__(
        self,
        command: Callable[[dict[str, Any]], list[str]],
        env: dict[str, str],
        cwd: Path,
        budget: Callable[[str], float],
        log: Callable[[str], None],
    ):
        self.command, self.env, self.cwd, self.budget, self.log = command, env, cwd, budget, log
        self.probe: dict[str, Any] | None = None
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, rows: list[str], task: dict[str, Any]) -> None:
        """Measure ``rows`` in order in one worker, and in a fresh one after any row that ended its worker.
        The first worker also probes the machine (its time counts to the first row's budget)."""
        pending = list(rows)
        while pending:
            budget = self.budget(pending[0])
            if budget <= 0:
                for key in list(pending):
                    self._finish(pending, RowProgress(key, 0).partial("not run", "the check's time ran out"))
                return
            progress = RowProgress(pending[0], budget)
            command = self.command({**task, "rows": pending, "probe": self.probe is None})
            worker = Worker.start(command, self.env, self.cwd)
            try:
                self._follow(worker, pending, progress)
            finally:
                worker.kill()

    def _follow(self, worker: Worker, pending: list[str], progress: RowProgress) -> None:
        """Record the worker's events until its rows are done, it dies, or the current row's budget ends."""
        while pending:
            try:
                event = worker.next_event(progress.deadline)
            except TimeoutError:
                done = f"{len(progress.steps)} measured and {progress.warmup_steps} warm-up steps"
                reason = f"ran out of its {progress.budget_s:.0f} s budget after {done}"
                self._finish(pending, progress.partial("timeout", reason))
                return
            if event is None:
                self._finish(pending, progress.partial("crashed", worker.death()))
                return
            if event["event"] == "probe":
                self.probe = event
            elif event["event"] == "step":
                if event["warmup"]:
                    progress.warmup_steps += 1
                else:
                    progress.steps.append(event["seconds"])
                kind = "warm-up step" if event["warmup"] else "step"
                self.log(f"  {event['key']}: {kind} {event['index'] + 1}: {event['seconds']:.3f} s")
            elif event["event"] == "row":
                self._finish(pending, {**event, "row_s": progress.elapsed()})
                if pending:
                    progress = RowProgress(pending[0], self.budget(pending[0]))
                    if progress.budget_s <= 0:
                        return  # run() reports the rest as not run

    def _finish(self, pending: list[str], result: dict[str, Any]) -> None:
        result.pop("event", None)
        key = result["key"]
        self.results[key] = result
        pending.remove(key)
        self.log(f"  {key}: {result['status']} after {result['row_s']:.1f} s")
