"""One trainer per run URI, one process per work directory: two real ``python -m job run`` processes at once.

The tiny job of the chaos test (``scripts/chaos.py``) against moto (S3 conditional writes) and a local run
URI (``O_EXCL``). No wall-clock bounds are asserted: the timeouts are generous, the order of events is what
is checked.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from job.errors import ExitCode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import chaos

pytestmark = pytest.mark.slow

TIMEOUT = 600


class Running:
    """A job process whose stderr is collected line by line, so a test can wait for a moment in it."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=chaos.ROOT
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(re.search(pattern, line) for line in self.lines) or not self._reader.is_alive(),
                timeout=TIMEOUT,
            )
            assert found and any(re.search(pattern, line) for line in self.lines), self.log[-3000:]

    def finish(self) -> int:
        code = self.process.wait(timeout=TIMEOUT)
        self._reader.join(timeout=30)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


def lokr(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=chaos.ROOT)


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if " ERROR " in line)


def trained_steps(log: str) -> list[int]:
    return [int(step) for step in chaos._STEP.findall(log)]


def test_a_second_process_on_the_run_uri_waits_then_exits_75_naming_the_holder(s3, tiny_job, tmp_path):
    env = {**chaos.job_env(), "LOKR_LEASE_WAIT_SECONDS": "3", "LOKR_LEASE_TTL_SECONDS": "60"}
    run_uri = s3.uri("run")
    holder = Running(chaos.job_command(tiny_job, tmp_path / "first", run_uri), env)
    try:
        holder.wait_for(r"step \d+ trained")
        # Paused, the holder keeps its lease (60 s TTL) while the second process starts and waits, however
        # soon it would have finished the tiny job otherwise.
        holder.process.send_signal(signal.SIGSTOP)
        try:
            second = lokr(chaos.job_command(tiny_job, tmp_path / "second", run_uri), env)
        finally:
            holder.process.send_signal(signal.SIGCONT)
    finally:
        code = holder.finish()

    assert second.returncode == ExitCode.TRANSIENT, second.stderr[-3000:]
    line = first_error(second.stderr)
    assert f"run URI {run_uri} is held by another lokr-job process (host {socket.gethostname()}, " in line
    assert f"pid {holder.pid}, running 'run'" in line and "exiting 75" in line
    assert "lease: " in second.stderr and "waiting up to 3 s" in second.stderr
    assert "Traceback" not in second.stderr
    assert trained_steps(second.stderr) == []  # exactly one trains

    assert code == ExitCode.OK, holder.log[-3000:]
    assert trained_steps(holder.log)[-1] == chaos.MAX_STEPS
    # The waiting process never wrote the run URI: its status is the holder's, and the lease was released.
    status = json.loads(s3.get("run/status.json"))
    assert status["pid"] == holder.pid and status["exit_code"] == 0
    lease = json.loads(s3.get("run/lease.json"))
    assert lease["released"] and lease["holder"]["pid"] == holder.pid and lease["generation"] == 1


def test_after_sigkill_the_next_process_takes_over_after_the_ttl_and_ends_bit_identical(
    s3, tiny_job, tmp_path
):
    env = {**chaos.job_env(), "LOKR_LEASE_TTL_SECONDS": "4"}
    reference = chaos.run_attempt(
        chaos.job_command(tiny_job, tmp_path / "reference", s3.uri("reference")), env, None, timeout=TIMEOUT
    )
    assert reference.returncode == 0 and reference.adapter, reference.log[-3000:]

    run_uri = s3.uri("run")
    # Killed once its first checkpoint is durable: the lease it holds is left to expire.
    kill = chaos.Kill(signal.SIGKILL, "upload", chaos._UPLOADED, occurrence=1, delay=0.0)
    killed = chaos.run_attempt(
        chaos.job_command(tiny_job, tmp_path / "first", run_uri), env, kill, timeout=TIMEOUT
    )
    assert killed.killed and killed.returncode == -signal.SIGKILL, killed.log[-3000:]
    left = json.loads(s3.get("run/lease.json"))
    assert not left["released"] and left["generation"] == 1

    resumed = chaos.run_attempt(
        chaos.job_command(tiny_job, tmp_path / "second", run_uri), env, None, timeout=TIMEOUT
    )
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert (
        f"lease: took over {run_uri} from host {socket.gethostname()}, pid {left['holder']['pid']}"
        in resumed.log
    )
    assert resumed.resumed_from is not None and resumed.resumed_from >= chaos.CHECKPOINT_INTERVAL
    assert "Traceback" not in resumed.log
    assert resumed.adapter == reference.adapter
    assert json.loads(s3.get("run/lease.json"))["generation"] == 2


def test_a_second_process_on_the_work_directory_exits_75_at_once(tiny_job, tmp_path):
    env = chaos.job_env()
    work, run_uri = tmp_path / "work", str(tmp_path / "run")
    holder = Running(chaos.job_command(tiny_job, work, run_uri), env)
    try:
        holder.wait_for(r"step \d+ trained")
        second = lokr(chaos.job_command(tiny_job, work, run_uri), env)
    finally:
        code = holder.finish()

    assert second.returncode == ExitCode.TRANSIENT, second.stderr[-3000:]
    line = first_error(second.stderr)
    assert f"work directory {work} is in use by another lokr-job process (pid {holder.pid} on host" in line
    assert "Traceback" not in second.stderr
    assert "lease: " not in second.stderr  # refused before it came near the run URI

    assert code == ExitCode.OK, holder.log[-3000:]
    assert json.loads((work / "status.json").read_text())["pid"] == holder.pid
    assert json.loads((Path(run_uri) / "status.json").read_text())["exit_code"] == 0


def test_a_holder_that_lost_its_lease_stops_writing_and_exits_75_naming_the_new_holder(
    s3, tiny_job, tmp_path
):
    # A paused machine (SIGSTOP) outlives its lease: a second process takes over, and when the first one
    # wakes up it finds the lease gone, uploads nothing more and exits 75.
    env = {**chaos.job_env(), "LOKR_LEASE_TTL_SECONDS": "4"}
    run_uri = s3.uri("run")
    paused = Running(chaos.job_command(tiny_job, tmp_path / "first", run_uri), env)
    try:
        paused.wait_for(r"step \d+ trained")
        paused.process.send_signal(signal.SIGSTOP)
        successor = Running(chaos.job_command(tiny_job, tmp_path / "second", run_uri), env)
        successor.wait_for("lease: took over")
        paused.process.send_signal(signal.SIGCONT)
        code = paused.finish()
    finally:
        paused.process.send_signal(signal.SIGCONT)
        successor_code = successor.finish()

    assert code == ExitCode.TRANSIENT, paused.log[-3000:]
    line = first_error(paused.log)
    assert (
        f"this process lost the lease on {run_uri}: host {socket.gethostname()}, pid {successor.pid} took it over"
        in line
    )
    assert "Traceback" not in paused.log
    assert successor_code == ExitCode.OK, successor.log[-3000:]
    status = json.loads(s3.get("run/status.json"))
    assert status["pid"] == successor.pid and status["exit_code"] == 0
    assert trained_steps(successor.log)[-1] == chaos.MAX_STEPS
