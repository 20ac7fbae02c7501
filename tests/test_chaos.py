"""The chaos test (``scripts/chaos.py``) against moto: 5 SIGTERMs and 5 SIGKILLs at random moments, each
attempt on a fresh work directory, until the run finishes with the uninterrupted run's adapter. And one
SIGTERM during training in detail: exit 75 within the grace budget, then the next run starts at the step
after the last one trained."""

import json
import signal
import sys
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
    assert stopped.seconds_after_signal is not None and stopped.seconds_after_signal <= chaos.GRACE_SECONDS
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
