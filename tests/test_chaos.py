"""The chaos test (``scripts/chaos.py``) against moto: 5 SIGTERMs and 5 SIGKILLs at random moments, each
attempt on a fresh work directory, until the run finishes with the uninterrupted run's adapter. And one
SIGTERM during training in detail: exit 75, then the next run starts at the step after the last one trained;
and one while the store is too slow for the last upload to fit the budget: that upload is abandoned without
its marker. No wall-clock bound here is tight: the budget is measured by scripts/bench_grace.py."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.train.remote import remote_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import chaos

pytestmark = pytest.mark.slow


def test_chaos_kills_lose_nothing(s3, tiny_job, tmp_path):
    result = chaos.run_chaos(
        tiny_job,
        tmp_path,
        s3.uri("run"),
        s3.uri("reference"),
        kills=5,
        seed=20261124,
        remote_steps=remote_checkpoints,
    )
    chaos.report(result)
    assert result.kills(signal.SIGTERM) >= 5 and result.kills(signal.SIGKILL) >= 5
    assert result.adapter == result.reference
    complete = [step for step, done in remote_checkpoints(s3.uri("run")).items() if done]
    assert len(complete) <= chaos.CHECKPOINT_LIMIT


def test_sigterm_during_training_saves_and_the_next_run_continues(s3, tiny_job, tmp_path):
    env, run_uri = chaos.job_env(), s3.uri("run")
    kill = chaos.Kill(signal.SIGTERM, "step", chaos._STEP, occurrence=5, delay=0.0)
    stopped = chaos.run_attempt(chaos.job_command(tiny_job, tmp_path / "first", run_uri), env, kill)
    assert stopped.killed and stopped.returncode == 75, stopped.log[-3000:]
    assert (
        stopped.seconds_after_signal is not None and stopped.seconds_after_signal <= chaos.SIGNAL_EXIT_BOUND_S
    )
    last = stopped.last_step
    assert last is not None and last >= 5
    status = json.loads(s3.get("run/status.json"))
    assert status["exit_code"] == 75 and "SIGTERM" in status["exit_reason"]
    assert status["last_remote_checkpoint"] == f"checkpoint-{last:08d}"
    assert json.loads((tmp_path / "first" / "status.json").read_text())["exit_code"] == 75

    resumed = chaos.run_attempt(chaos.job_command(tiny_job, tmp_path / "second", run_uri), env, None)
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert min(resumed.steps) == last + 1
    assert resumed.resumed_from == last


def test_an_upload_that_does_not_fit_the_budget_is_abandoned_without_its_marker(s3, tiny_job, tmp_path):
    env = {**chaos.job_env(), "LOKR_GRACE_SECONDS": "6", "LOKR_LEASE_TTL_SECONDS": "120"}
    run_uri, workdir = s3.uri("run"), tmp_path / "work"
    command = chaos.job_command(tiny_job, workdir, run_uri, (*chaos.OVERRIDES[:3], "max_train_steps=400"))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    lines = []
    for (
        line
    ) in process.stderr:  # up to step 3: no checkpoint yet, so the one the signal asks for is the only one
        lines.append(line)
        if "step 3 trained" in line:
            break
    s3.faults.configure(delay=3.0)  # every request to the store now takes 3 s
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 75, "".join(lines[-40:])
    s3.faults.off()
    log = "".join(lines)
    assert time.monotonic() - signalled <= chaos.SIGNAL_EXIT_BOUND_S, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    saved = [int(m) for m in chaos._SAVED.findall(log)]
    assert saved and not chaos._UPLOADED.search(log), log[-3000:]
    assert "upload still running" in log or "grace budget of 6 s ran out" in log, log[-3000:]
    # Whatever of it reached the store has no marker: it is never loaded.
    assert remote_checkpoints(run_uri).get(saved[-1]) is not True
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "exited" and status["exit_code"] == 75 and "SIGTERM" in status["exit_reason"]
