"""The tiny job through the real CLI, twice: once straight through (A), once stopped by SIGTERM during
training and run again to the end (B). Same adapter bytes or not, reported either way.

If A and B differ, a third, uninterrupted run (C) tells the two causes apart: A ≠ C means the training
step itself is not deterministic on this device (run to run), A = C means resuming loses something.
Each differing tensor is listed with its largest difference.

A and B train at the same time (they are independent, and each is mostly process start-up). Building the
tiny job needs no GPU, so it can overlap the rows; ``gate`` holds the training runs back until the rows
are done where they would share the GPU with them.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_STEP = re.compile(r"step (\d+) trained")
_RESUMED = re.compile(r"resumed from \S*checkpoint-(\d+)")
EXIT_PREEMPTED = 75


@dataclass
class TinyJobResult:
    status: str = "ok"  # "ok" (every run exited as expected), "failed" (one did not), "timeout"
    identical: bool | None = None  # A's adapter bytes equal B's
    runs: list[dict[str, Any]] = field(default_factory=list)
    signal_after_step: int | None = None
    resumed_from_step: int | None = None
    run_to_run_identical: bool | None = None  # A = C, only looked at when A ≠ B
    differences: list[str] = field(default_factory=list)
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.status != "ok":
            return f"tiny job: {self.status}: {self.reason}"
        stopped = f"SIGTERM after step {self.signal_after_step}, resumed from step {self.resumed_from_step}"
        verdict = "same adapter bytes" if self.identical else "DIFFERENT adapter bytes"
        text = f"tiny job, uninterrupted vs stopped ({stopped}) and resumed: {verdict}"
        if self.run_to_run_identical is not None:
            cause = "resuming" if self.run_to_run_identical else "run-to-run nondeterminism"
            text += f"; two uninterrupted runs {'agree' if self.run_to_run_identical else 'differ'}: {cause}"
        return text


@dataclass(frozen=True)
class Finished:
    code: int
    log: str


class _OutOfTime(Exception):
    pass


class TinyJobCheck:
    def __init__(
        self,
        repo: Path,
        steps: int,
        signal_step: int,
        deadline: float,
        env: dict[str, str],
        gate: threading.Event | None = None,
    ):
        self.repo, self.steps, self.signal_step = repo, steps, signal_step
        self.deadline, self.gate = deadline, gate
        self.env = {
            **env,
            "LOKR_LOG_LEVEL": "INFO",
            "LOKR_LOG_STEPS": "1",  # a "step N trained" line per step: where to send the signal
            "PYTHONUNBUFFERED": "1",
        }
        self.result = TinyJobResult()
        self.config = Path()  # the tiny job's config.json, once built
        self._thread = threading.Thread(target=self._run, name="tiny-job")

    def start(self) -> None:
        """Begin on a thread of its own (the rows are measured meanwhile)."""
        self._thread.start()

    def finish(self) -> TinyJobResult:
        self._thread.join()
        return self.result

    def _run(self) -> None:
        with tempfile.TemporaryDirectory(prefix="gpu-check-tiny-") as scratch:
            try:
                self._check(Path(scratch))
            except _OutOfTime as exc:
                self.result.status, self.result.reason = "timeout", str(exc)
            except Exception as exc:  # reported in the table like a run that failed, not lost on a thread
                traceback.print_exc()
                self.result.status, self.result.reason = "failed", f"{type(exc).__name__}: {exc}"

    def _check(self, root: Path) -> None:
        from job.train.output import ADAPTER_FILE

        if not self._expect("build", self._cli("build", "tiny", str(root / "job-files")), 0):
            return
        self.config = root / "job-files" / "config" / "config.json"
        if self.gate is not None and not self.gate.wait(self._remaining("the rows finished")):
            raise _OutOfTime("its time ran out while the rows were measured")
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(self._train, "A", root / "A")
            stopped = self._train_stopped(root / "B")
            a_ok = self._expect("A", plain.result(), 0)
        if not (a_ok and self._expect("B stopped", stopped, EXIT_PREEMPTED)):
            return
        resumed = self._train("B resumed", root / "B")
        if not self._expect("B resumed", resumed, 0):
            return
        found = _RESUMED.search(resumed.log)
        self.result.resumed_from_step = int(found.group(1)) if found else None
        a, b = (root / name / "output" / ADAPTER_FILE for name in ("A", "B"))
        self.result.identical = a.read_bytes() == b.read_bytes()
        if self.result.identical:
            return
        self.result.differences = tensor_differences(a, b)
        if self._expect("C", self._train("C", root / "C"), 0):
            c = root / "C" / "output" / ADAPTER_FILE
            self.result.run_to_run_identical = a.read_bytes() == c.read_bytes()

    def _remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime(f"its time ran out before {what}")
        return left

    def _train_args(self, workdir: Path) -> list[str]:
        steps = f"max_train_steps={self.steps}"
        return ["run", "--config", str(self.config), "--workdir", str(workdir), "--set", steps]

    def _train(self, label: str, workdir: Path) -> Finished:
        return self._cli(label, *self._train_args(workdir))

    def _cli(self, label: str, *args: str, stop_at_step: int | None = None) -> Finished:
        """``python -m job ARGS``, held to the deadline; with ``stop_at_step``, SIGTERM'd once it logs
        that step as trained."""
        started, remaining = time.monotonic(), self._remaining(label)
        process = subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.repo,
        )
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            process.kill()

        # Reading its log blocks; the timer ends a run that outlives the deadline, and with it the reading.
        timer = threading.Timer(remaining, expire)
        timer.start()
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            step = _STEP.search(line)
            if stop_at_step is not None and step and int(step.group(1)) >= stop_at_step:
                process.send_signal(signal.SIGTERM)
                stop_at_step = None
        code = process.wait()
        timer.cancel()
        if expired.is_set():
            raise _OutOfTime(f"its time ran out during {label}")
        self.result.runs.append({"run": label, "exit": code, "seconds": round(time.monotonic() - started, 1)})
        print(f"  tiny job {label}: exit {code} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return Finished(code, "".join(lines))

    def _train_stopped(self, workdir: Path) -> Finished:
        finished = self._cli("B stopped", *self._train_args(workdir), stop_at_step=self.signal_step)
        steps = [int(m.group(1)) for m in map(_STEP.search, finished.log.splitlines()) if m]
        self.result.signal_after_step = max(steps, default=None)
        return finished

    def _expect(self, label: str, finished: Finished, code: int) -> bool:
        if finished.code == code:
            return True
        lines = [line for line in finished.log.strip().splitlines() if line.strip()]
        print("\n".join(lines[-15:]), file=sys.stderr)
        last = lines[-1][:300] if lines else "no output"
        self.result.status = "failed"
        self.result.reason = f"{label} exited {finished.code}, expected {code}: {last}"
        return False


def tensor_differences(a: Path, b: Path, limit: int = 10) -> list[str]:
    """The tensors that differ between two adapters, the largest difference first."""
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    found = []
    for name in sorted(first.keys() | second.keys()):
        if name not in first or name not in second:
            found.append((float("inf"), f"{name}: only in one file"))
            continue
        x, y = first[name].float(), second[name].float()
        if x.shape != y.shape:
            found.append((float("inf"), f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)}"))
        elif not bool((x == y).all()):
            diff = float((x - y).abs().max())
            found.append((diff, f"{name}: max |difference| {diff:.3g}"))
    found.sort(key=lambda item: -item[0])
    return [text for _, text in found[:limit]]
