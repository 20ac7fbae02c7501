"""The tiny job as two real processes (DDP over gloo on the CPU), started the way the image starts them:
``docker/entrypoint.sh`` with ``LOKR_NPROC_PER_NODE=2`` runs ``docker/launch.py`` (torchrun), exactly as
the multi-GPU and multi-node Kubernetes Jobs do. Only rank 0 writes checkpoints and the adapter; a run
stopped after a checkpoint and started again ends with the same bytes as an uninterrupted one; a failure
on the process that fetches and warms ends every rank with its exit code; ranks agree on when to stop
and on the checkpoint to resume from."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from job.errors import ExitCode
from job.train.checkpoint import list_checkpoints
from job.train.output import ADAPTER_FILE

pytestmark = pytest.mark.slow

ENTRYPOINT = Path(__file__).parents[1] / "docker" / "entrypoint.sh"


def entrypoint_env(config: Path, workdir: Path) -> dict[str, str]:
    # The venv first on PATH: the entrypoint runs `python3 launch.py` and torchrun starts `lokr-job`.
    return {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "LOKR_CONFIG": str(config),
        "LOKR_WORKDIR": str(workdir),
        "LOKR_NPROC_PER_NODE": "2",
        "LOKR_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",  # two ranks on a busy CI box: more threads only make them crawl
    }


def entrypoint(config: Path, workdir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [arg for override in overrides for arg in ("--set", override)]
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=entrypoint_env(config, workdir),
        timeout=300,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.fixture(scope="module")
def runs(tiny_job: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("multiprocess")
    logs = {"whole": succeeded(entrypoint(tiny_job, root / "whole"))}
    # Stopped right after the step-16 checkpoint, then run again to the end (24 steps).
    logs["first"] = succeeded(entrypoint(tiny_job, root / "resumed", "max_train_steps=16"))
    logs["second"] = succeeded(entrypoint(tiny_job, root / "resumed"))
    return {"root": root, "logs": logs}


def test_two_ranks_train_one_model_together(runs) -> None:
    root, log = runs["root"], runs["logs"]["whole"]
    assert "--nproc-per-node 2 --nnodes 1 --standalone" in log  # a free port: parallel runs never clash
    assert log.count("step 24/24") == 2  # both ranks ran every step ...
    state = json.loads((root / "whole/checkpoints/checkpoint-00000024/trainer_state.json").read_text())
    assert state["world_size"] == 2  # ... as one process group, not two lone runs of world size 1
    # Each rank's generators are in the checkpoint, for code outside the seeded step (a LyCORIS dropout).
    rng = torch.load(root / "whole/checkpoints/checkpoint-00000024/rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and all(torch.is_tensor(rank["torch"]) for rank in rng["ranks"])


def test_only_rank_0_writes_checkpoints_and_the_adapter(runs) -> None:
    root, log = runs["root"], runs["logs"]["whole"]
    for step in (8, 16, 24):
        assert log.count(f"checkpoint checkpoint-{step:08d} saved") == 1
    assert log.count("train: adapter written to") == 1
    assert [step for step, _ in list_checkpoints(root / "whole" / "checkpoints")] == [16, 24]
    assert not list((root / "whole" / "checkpoints").glob(".*")), "no temporary folder left behind"


def test_a_resumed_two_rank_run_ends_bit_identical(runs) -> None:
    root, logs = runs["root"], runs["logs"]
    assert logs["first"].count("step 16/16") == 2
    assert logs["second"].count("resumed from") == 2  # each rank loads the same checkpoint
    assert "checkpoint-00000016 (step 16" in logs["second"]
    whole = (root / "whole" / "output" / ADAPTER_FILE).read_bytes()
    assert (root / "resumed" / "output" / ADAPTER_FILE).read_bytes() == whole


def test_a_failure_on_the_warming_rank_ends_every_rank_with_its_code(tiny_job: Path, tmp_path: Path) -> None:
    # More images a step than the tiny dataset holds: warm (rank 0 alone) finds no usable bucket.
    result = entrypoint(tiny_job, tmp_path / "work", "train_batch_size=64")
    assert result.returncode == ExitCode.BAD_DATA, result.stderr[-4000:]
    assert "rank 0 (the first process on this machine) failed, so this rank stops too" in result.stderr


def test_sigterm_stops_both_ranks_at_the_same_step_with_one_checkpoint(
    tiny_job: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "job.log"
    overrides = ["--set", "max_train_steps=5000", "--set", "checkpoint_step_interval=5000"]
    with open(log_path, "w") as log:
        # The entrypoint execs the launcher: this pid is torchrun's, which forwards SIGTERM to both ranks.
        job = subprocess.Popen(
            ["bash", str(ENTRYPOINT), *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=entrypoint_env(tiny_job, tmp_path / "work"),
        )
        deadline = time.monotonic() + 120
        while log_path.read_text().count("first step done") < 2 and job.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=120)
    text = log_path.read_text()
    assert code == 128 + signal.SIGTERM, text[-4000:]  # launch.py reports the signal; retried like 75
    stops = re.findall(r"training stopped early at step (\d+)", text)
    assert len(stops) == 2 and stops[0] == stops[1], text[-4000:]
    checkpoints = [step for step, _ in list_checkpoints(tmp_path / "work" / "checkpoints")]
    assert checkpoints == [int(stops[0])]


WORKER = """
import os, sys
from job import distributed
from job.errors import ConfigError

rank = int(os.environ["RANK"])
assert distributed.any_rank(lambda: rank == 1)() is True, "a stop request on one rank stops all"
assert distributed.any_rank(lambda: False)() is False
try:
    distributed.require_same(rank, "the rank")
except ConfigError as exc:
    print(exc.message, flush=True)
    distributed.shutdown()
    sys.exit(int(exc.exit_code))
"""


def test_ranks_agree_on_stopping_and_refuse_to_resume_from_different_checkpoints(tmp_path: Path) -> None:
    launch = Path(__file__).parents[1] / "docker" / "launch.py"
    result = subprocess.run(
        [sys.executable, str(launch), "--standalone", "--nproc-per-node", "2", "--no-python",
         sys.executable, "-c", WORKER],
        cwd=tmp_path, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-4000:]
    assert result.stdout.count("the processes disagree on the rank (rank 0: 0, rank 1: 1)") == 2
