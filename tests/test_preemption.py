"""The signal flag, the grace budget and status.json, in small subprocesses (signals are process-wide).

Timing here is the mechanism's, with generous bounds (a loaded two-core machine stretches everything): the
budget itself, signal to process exit, is measured by ``scripts/bench_grace.py`` (BENCHMARKS.md)."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from job.errors import ExitCode, TransientError
from job.preemption import Preemption
from job.track.status import StatusReporter

# A process that installs the handlers, reports status.json as a stage does, then loops at "step boundaries".
# argv: status path, what to do once stopped: "sleep N" (the checkpoint and upload) or "matmul" (a torch op
# that runs for minutes, all of it in one C call).
_LOOP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from job.track.status import reporting
    from job import preemption
    state = preemption.install()
    with reporting(Path(sys.argv[1]), None, "train"):
        print("ready", flush=True)
        if sys.argv[2] == "matmul":
            import torch
            torch.set_num_threads(1)
            torch.linalg.matrix_power(torch.eye(3000, dtype=torch.float64), 2**40 - 1)
            print("the C call returned", flush=True)
        while not preemption.stop_requested():
            time.sleep(0.01)
        print("stop requested:", state.reason, flush=True)
        time.sleep(0 if sys.argv[2] == "matmul" else float(sys.argv[2]))
    """
)
# Far above the budgets used here, far below the minutes the blocked work would take.
_GENEROUS_S = 30.0


def start(status: Path, then: str, grace: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LOKR_GRACE_SECONDS": grace, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(status), then], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def final_status(path: Path) -> dict:
    status = json.loads(path.read_text())
    assert status["phase"] == "exited" and status["exit_code"] == 75, status
    return status


def test_sigterm_only_sets_the_flag(tmp_path):
    process = start(tmp_path / "status.json", "0", "20")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert "stop requested: preempted (SIGTERM)" in out
    assert process.returncode == 0  # the process chose where to stop, and how to exit


def test_a_second_signal_exits_75_at_once_with_a_final_status(tmp_path):
    process = start(tmp_path / "status.json", "600", "600")
    process.send_signal(signal.SIGTERM)
    assert process.stdout is not None and "stop requested" in process.stdout.readline()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=_GENEROUS_S) == ExitCode.TRANSIENT
    reason = final_status(tmp_path / "status.json")["exit_reason"]
    assert "SIGTERM" in reason and "second signal" in reason


def test_the_watchdog_exits_75_with_a_final_status(tmp_path):
    process = start(tmp_path / "status.json", "600", "2")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=_GENEROUS_S) == ExitCode.TRANSIENT
    assert "grace budget of 2 s ran out" in final_status(tmp_path / "status.json")["exit_reason"]


def test_a_main_thread_inside_a_long_c_call_still_exits_within_the_budget(tmp_path):
    # Python runs the signal handler only when the C call returns (minutes from now); the watcher thread
    # sees the signal's delivery and the budget holds.
    process = start(tmp_path / "status.json", "matmul", "2")
    time.sleep(0.5)  # well inside the C call
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=_GENEROUS_S) == ExitCode.TRANSIENT
    assert time.monotonic() - signalled < _GENEROUS_S
    assert process.stdout is not None and "the C call returned" not in process.stdout.read()
    assert "grace budget" in final_status(tmp_path / "status.json")["exit_reason"]


def test_raise_if_requested_is_transient():
    state = Preemption(5)
    state.raise_if_requested("warm")  # nothing requested: no exception
    state.handle(signal.SIGTERM, None)
    with pytest.raises(TransientError, match="SIGTERM"):
        state.raise_if_requested("warm")
    # The watcher leaves a reserve of the budget for the exit itself.
    assert 0 < state.remaining() <= 5 - state.reserve


def test_status_json_is_written_atomically_and_without_secrets(tmp_path, monkeypatch):
    secret = "hf_abcdefghijklmnopqrstuvwxyz012345"
    monkeypatch.setenv("HF_TOKEN", secret)
    run = tmp_path / "run"
    reporter = StatusReporter(tmp_path / "work" / "status.json", str(run))
    reporter.phase("train")
    reporter.checkpoint("checkpoint-00000008", 8, 24)
    reporter.checkpoint("checkpoint-00000016", 16, 24)
    reporter.finish(f"preempted (SIGTERM): upload to https://user:{secret}@host failed", 75)
    for path in (tmp_path / "work" / "status.json", run / "status.json"):
        text = path.read_text()
        assert secret not in text
        status = json.loads(text)
        assert status["phase"] == "exited" and status["exit_code"] == 75
        assert status["step"] == 16 and status["max_steps"] == 24
        assert status["last_checkpoint"] == "checkpoint-00000016"
        assert status["seconds_per_step"] is not None and status["eta_seconds"] is not None
        assert status["host"] and status["started_at"] <= status["updated_at"]
    assert not list((tmp_path / "work").glob(".*tmp")), "no temp file left behind"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs (root only: the test container runs as root; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_still_leaves_a_final_status(small_disk: Path):
    reporter = StatusReporter(small_disk / "status.json", None)
    reporter.phase("train")
    with open(small_disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError) as full:
        while True:
            filler.write(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    reporter.finish("disk full (ENOSPC) writing checkpoints", 75)
    status = final_status(small_disk / "status.json")
    assert status["exit_reason"].startswith("disk full")
