"""The image, built from the real Dockerfile and run as users run it (scripts/docker_sandbox.py builds it on a
private Docker engine; the CUDA base and torch index are swapped by build-args only).

- `IMAGE --help` answers at once; `IMAGE check --config ...` passes on the tiny job;
- the tiny job end to end through the entrypoint, every setting from the environment (the RunPod/Vast way),
  with the run URI a mounted folder and then S3 on a moto server on the host network: the same adapter;
- `docker stop --time 30` mid-training exits 75 with a checkpoint in the run URI, and a new container on an
  empty work directory resumes to the same adapter bytes as the uninterrupted run;
- a code-only change rebuilds only the project's own layer, well under 5 MB.

A machine where dockerd cannot start or the package registries cannot be reached fails here, loudly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_trees import put_tree_s3
from servers.s3 import FAKE_CREDENTIALS

from job.errors import ExitCode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import docker_sandbox

pytestmark = pytest.mark.slow
ADAPTER = "pytorch_lora_weights.safetensors"
TAG = "lokr-job:test"
# Long enough that a stop sent after step STOP_AFTER lands in training, short enough to run three times.
MAX_STEPS = 160
STOP_AFTER = 12
CODE_LAYER_LIMIT = 5_000_000


@pytest.fixture(scope="module")
def index() -> Iterator[docker_sandbox.TorchIndex]:
    with docker_sandbox.torch_index() as served:
        yield served


@pytest.fixture(scope="module")
def engine() -> Iterator[docker_sandbox.Engine]:
    with docker_sandbox.engine() as started:
        yield started


@pytest.fixture(scope="module")
def base(engine) -> str:
    return docker_sandbox.make_base(engine)


@pytest.fixture(scope="module")
def dockerd(engine, base, index, tmp_path_factory: pytest.TempPathFactory) -> docker_sandbox.Engine:
    """The engine, with the image built as TAG."""
    logs = tmp_path_factory.mktemp("build-logs")
    docker_sandbox.build(engine, TAG, base=base, index_url=index.url, log_path=logs / "build.log")
    return engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny job written on the host by root, as `lokr-job tiny` writes it: the image's uid 1000 reads it."""
    root = tmp_path_factory.mktemp("jobs") / "tiny"
    subprocess.run([sys.executable, "-m", "job", "tiny", str(root)], check=True, capture_output=True)
    config = root / "config" / "config.json"
    settings = json.loads(config.read_text())
    settings.update(max_train_steps=MAX_STEPS, checkpoint_step_interval=8, checkpoints_total_limit=2)
    config.write_text(json.dumps(settings, indent=2))
    config.chmod(0o644)
    return root


def docker_run(
    *args: str, env: dict[str, str] | None = None, mounts: dict[Path, str] | None = None, detach: bool = False
) -> list[str]:
    """`docker run` as the docs give it, on the host's network (where the test servers listen)."""
    command = ["run", "--network", "host", "--stop-timeout", "60", *(["--detach"] if detach else [])]
    for host, inside in (mounts or {}).items():
        command += ["--volume", f"{host}:{inside}"]
    for name, value in {"LOKR_LOG_STEPS": "1", **(env or {})}.items():
        command += ["--env", f"{name}={value}"]
    return [*command, TAG, *args]


def run_container(engine: docker_sandbox.Engine, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return engine.docker(*docker_run(*args, **kwargs), check=False, timeout=600)


def job_env(config: str, run_uri: str) -> dict[str, str]:
    return {"LOKR_CONFIG": config, "LOKR_RUN_URI": run_uri}


def test_help_answers_at_once_with_the_cli_help(dockerd):
    result = run_container(dockerd, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lokr-job") and "exit codes:" in result.stdout


def test_check_passes_on_the_tiny_job(dockerd, tiny):
    result = run_container(
        dockerd, "check", "--config", "/jobs/tiny/config/config.json", mounts={tiny: "/jobs/tiny:ro"}
    )
    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def uninterrupted(dockerd, tiny, tmp_path_factory) -> bytes:
    """The tiny job through the entrypoint with no arguments, settings from the environment, the run URI a
    mounted folder (root's on the host: the entrypoint gives it to uid 1000)."""
    runs = tmp_path_factory.mktemp("runs")
    runs.chmod(0o755)  # as `mkdir` makes it (pytest's are 0700): the container's uid 1000 passes through
    env = job_env("/jobs/tiny/config/config.json", "/runs/local")
    result = run_container(dockerd, env=env, mounts={tiny: "/jobs/tiny:ro", runs: "/runs"})
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    assert f"step {MAX_STEPS} trained" in result.stderr
    return (runs / "local" / "output" / ADAPTER).read_bytes()


def test_the_tiny_job_runs_from_the_environment_into_a_mounted_run_uri(uninterrupted):
    assert len(uninterrupted) > 1000  # a safetensors file with the LoKr's tensors


def test_the_tiny_job_runs_with_everything_on_s3(dockerd, tiny, s3, uninterrupted):
    put_tree_s3(s3, tiny.parent, "jobs")
    env = job_env(s3.uri("jobs/tiny/config/config.json"), s3.uri("run"))
    env |= {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": s3.url}
    result = run_container(dockerd, env=env)
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    assert s3.get(f"run/output/{ADAPTER}") == uninterrupted


def test_docker_stop_mid_training_exits_75_and_a_new_container_resumes_to_the_same_bytes(
    dockerd, tiny, tmp_path, uninterrupted
):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o755)
    env = job_env("/jobs/tiny/config/config.json", "/runs/stopped")
    mounts = {tiny: "/jobs/tiny:ro", runs: "/runs"}
    container = dockerd.docker(*docker_run(env=env, mounts=mounts, detach=True)).stdout.strip()
    logs = subprocess.Popen(
        [docker_sandbox.CLIENT, "logs", "--follow", container],
        env=dockerd.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert logs.stderr is not None
    seen = []
    for line in logs.stderr:
        seen.append(line)
        if f"step {STOP_AFTER} trained" in line:
            break
    dockerd.docker("stop", "--time", "30", container)
    logs.kill()
    exit_code = int(dockerd.docker("wait", container).stdout)
    log = dockerd.docker("logs", container).stderr
    # 75, not 137: the job saved and exited within docker stop's 30 s, before the SIGKILL.
    assert exit_code == ExitCode.TRANSIENT, log[-4000:]
    assert "Traceback" not in log
    checkpoints = sorted((runs / "stopped" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, f"no checkpoint in the run URI after exit 75:\n{log[-3000:]}"
    assert not (runs / "stopped" / "output" / ADAPTER).exists()

    # A new container: its own empty work directory, the same run URI.
    resumed = run_container(dockerd, env=env, mounts=mounts)
    assert resumed.returncode == ExitCode.OK, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    assert (runs / "stopped" / "output" / ADAPTER).read_bytes() == uninterrupted


def test_a_code_only_change_adds_one_small_layer(dockerd, base, index, tmp_path):
    context = docker_sandbox.copy_context(tmp_path)
    with (context / "job" / "__init__.py").open("a") as module:
        module.write("\n# a code-only change\n")
    docker_sandbox.build(dockerd, "lokr-job:code-change", base=base, index_url=index.url, context=context)
    before = docker_sandbox.layers(dockerd, TAG)
    after = docker_sandbox.layers(dockerd, "lokr-job:code-change")
    kept = {diff_id for diff_id, _ in before}
    added = [(diff_id, size) for diff_id, size in after if diff_id not in kept]
    assert len(after) == len(before) and len(added) == 1, (before, after)
    assert added[0][1] < CODE_LAYER_LIMIT, f"a code change ships {added[0][1] / 1e6:.1f} MB"
    # The dependencies' layer, gigabytes with torch, is the same one.
    assert max(size for _, size in before) > 500_000_000 and max(after, key=lambda layer: layer[1]) in before
