"""The signal flag, the grace budget and status.json, in small subprocesses (signals are process-wide)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from job.errors import ExitCode, TransientError
from job.track.status import StatusReporter
from job.train.preemption import Preemption

# A process that installs the handlers, reports when it is ready, then loops at "step boundaries".
_LOOP = textwrap.dedent(
    """
    import sys, time
    from job.train import preemption
    state = preemption.install()
    print("ready", flush=True)
    while not preemption.stop_requested():
        time.sleep(0.01)
    print("stop requested:", state.reason, flush=True)
    time.sleep(float(sys.argv[1]))  # the "checkpoint and upload" that follows
    """
)


def start(seconds_after: float, grace: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LOKR_GRACE_SECONDS": grace}
    process = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(seconds_after)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_sigterm_only_sets_the_flag():
    process = start(0.0, "20")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=20)
    assert "stop requested: preempted (SIGTERM)" in out
    assert process.returncode == 0  # the process chose where to stop, and how to exit


def test_a_second_signal_exits_75_at_once():
    process = start(30.0, "60")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=5) == ExitCode.TRANSIENT


def test_the_grace_budget_running_out_exits_75():
    process = start(30.0, "1")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == ExitCode.TRANSIENT
    assert time.monotonic() - started < 3


def test_raise_if_requested_is_transient():
    state = Preemption(5)
    state.raise_if_requested("warm")  # nothing requested: no exception
    state.handle(signal.SIGTERM, None)
    with pytest.raises(TransientError, match="SIGTERM"):
        state.raise_if_requested("warm")
    assert 0 < state.remaining() <= 5


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
