"""The real CLI in subprocesses: an interrupted run, resumed (past a broken checkpoint, or past one whose
marker matches but whose contents do not load, locally or at the run URI), ends bit-identical to an
uninterrupted one; a finished run is not redone; the adapter loads into a fresh AuraFlowPipeline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from job.train.checkpoint import UNLOADABLE_SUFFIX, list_checkpoints, write_marker
from job.train.output import ADAPTER_FILE, RESULT_FILE
from job.train.remote import remote_checkpoints

pytestmark = pytest.mark.slow


def lokr_job(*args: str) -> subprocess.CompletedProcess[str]:
    # One torch thread: the tiny model gains nothing from more, and a busy CI box makes them crawl.
    env = {**os.environ, "LOKR_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "job", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    lokr_job("tiny", str(root / "job"))
    config = str(root / "job" / "config" / "config.json")
    # A: 24 steps in one go (checkpoints every 8, keeping 2).
    lokr_job("run", "--config", config, "--workdir", str(root / "A"))
    # B: stopped at step 16, then the newest checkpoint is damaged, then run again to 24.
    lokr_job("run", "--config", config, "--workdir", str(root / "B"), "--set", "max_train_steps=16")
    damaged = root / "B" / "checkpoints" / "checkpoint-00000016" / "lokr.safetensors"
    with open(damaged, "r+b") as handle:
        handle.truncate(damaged.stat().st_size // 2)
    resumed = lokr_job("run", "--config", config, "--workdir", str(root / "B"))
    (root / "B-resume.log").write_text(resumed.stderr)
    return {"root": root, "config": Path(config)}


def test_interrupted_and_resumed_run_is_bit_identical(runs):
    root = runs["root"]
    log = (root / "B-resume.log").read_text()
    assert "checkpoint-00000016 is not usable" in log
    assert "resumed from" in log and "checkpoint-00000008 (step 8" in log
    a = (root / "A" / "output" / ADAPTER_FILE).read_bytes()
    b = (root / "B" / "output" / ADAPTER_FILE).read_bytes()
    assert a == b
    assert (root / "A" / "output" / RESULT_FILE).read_bytes() == (
        root / "B" / "output" / RESULT_FILE
    ).read_bytes()
    assert [step for step, _ in list_checkpoints(root / "A" / "checkpoints")] == [16, 24]
    assert [step for step, _ in list_checkpoints(root / "B" / "checkpoints")] == [16, 24]


def damage_inside_its_marker(folder: Path, step: int) -> None:
    """The adapter no longer deserialises, yet the marker matches: a complete checkpoint that cannot load."""
    adapter = folder / "lokr.safetensors"
    adapter.write_bytes(b"\xff" * adapter.stat().st_size)
    write_marker(folder, step)


@pytest.fixture(scope="module")
def fallbacks(runs: dict[str, Path]) -> dict[str, str]:
    root, config = runs["root"], str(runs["config"])
    # Locally: C stops at 16, its checkpoint-16 is damaged inside its marker, then C runs on to 24.
    lokr_job("run", "--config", config, "--workdir", str(root / "C"), "--set", "max_train_steps=16")
    damage_inside_its_marker(root / "C" / "checkpoints" / "checkpoint-00000016", 16)
    local = lokr_job("run", "--config", config, "--workdir", str(root / "C")).stderr
    # At the run URI: D1 leaves 8 and 16 there, 16 is damaged the same way, D2 (a fresh machine) continues.
    run_uri = str(root / "run-D")
    first = ("run", "--config", config, "--workdir", str(root / "D1"), "--run-uri", run_uri)
    lokr_job(*first, "--set", "max_train_steps=16")
    damage_inside_its_marker(root / "run-D" / "checkpoints" / "checkpoint-00000016", 16)
    remote = lokr_job("run", "--config", config, "--workdir", str(root / "D2"), "--run-uri", run_uri).stderr
    return {"local": local, "remote": remote}


def test_a_checkpoint_that_does_not_load_is_set_aside_and_the_one_before_resumes(runs, fallbacks):
    root, log = runs["root"], fallbacks["local"]
    assert "checkpoint-00000016 cannot be loaded" in log and "checkpoint-00000008 (step 8" in log, log[-3000:]
    assert "Traceback" not in log
    aside = list((root / "C" / "checkpoints").glob(f"checkpoint-00000016{UNLOADABLE_SUFFIX}*"))
    assert len(aside) == 1, "kept for inspection"
    assert (root / "C" / "output" / ADAPTER_FILE).read_bytes() == (
        root / "A" / "output" / ADAPTER_FILE
    ).read_bytes()


def test_a_run_uri_checkpoint_that_does_not_load_is_set_aside_there_too(runs, fallbacks):
    root, log = runs["root"], fallbacks["remote"]
    assert "checkpoint-00000016 cannot be loaded" in log and "checkpoint-00000008 (step 8" in log, log[-3000:]
    assert "remote checkpoint checkpoint-00000016 set aside" in log
    remote = root / "run-D" / "checkpoints"
    assert len(list(remote.glob(f"checkpoint-00000016{UNLOADABLE_SUFFIX}*"))) == 1
    # 16 at the run URI now is the one D2 trained anew; the damaged one is never fetched again.
    assert remote_checkpoints(str(root / "run-D")) == {16: True, 24: True}
    assert (root / "D2" / "output" / ADAPTER_FILE).read_bytes() == (
        root / "A" / "output" / ADAPTER_FILE
    ).read_bytes()


def test_a_finished_run_is_not_redone(runs):
    root = runs["root"]
    adapter = root / "A" / "output" / ADAPTER_FILE
    before = adapter.stat().st_mtime_ns
    result = lokr_job("train", "--config", str(runs["config"]), "--workdir", str(root / "A"))
    assert "nothing to do" in result.stderr
    assert adapter.stat().st_mtime_ns == before


def test_the_adapter_merges_into_a_fresh_pipeline(runs):
    from diffusers import AuraFlowPipeline
    from lycoris import create_lycoris_from_weights

    from job.model.lokr import reset_lycoris_preset

    root = runs["root"]
    adapter = str(root / "A" / "output" / ADAPTER_FILE)

    def pipeline() -> AuraFlowPipeline:
        pipe = AuraFlowPipeline.from_pretrained(root / "job" / "model")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(pipe: AuraFlowPipeline) -> torch.Tensor:
        result = pipe(
            "a red circle on blue",
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return result.images

    def velocity(pipe: AuraFlowPipeline) -> torch.Tensor:
        """The transformer's prediction on fixed inputs: where the adapter acts, before the VAE's decoder
        and two sampler steps shrink its effect towards the float error of merging."""
        config = pipe.transformer.config
        inputs = torch.Generator().manual_seed(1)
        latents = torch.randn(1, config.in_channels, 8, 8, generator=inputs)
        text = torch.randn(1, 8, config.joint_attention_dim, generator=inputs)
        with torch.no_grad():
            return pipe.transformer(latents, text, torch.tensor([0.5])).sample

    try:
        base_pipe = pipeline()
        base, base_velocity = images(base_pipe), velocity(base_pipe)
        # The trained network, applied on the fly (as in training)...
        live = pipeline()
        network, _ = create_lycoris_from_weights(1.0, adapter, live.transformer)
        network.apply_to()
        trained, trained_velocity = images(live), velocity(live)
        # ...and merged into the weights, as an inference user would.
        merged_pipe = pipeline()
        merged_net, _ = create_lycoris_from_weights(1.0, adapter, merged_pipe.transformer)
        merged_net.merge_to()
        merged, merged_velocity = images(merged_pipe), velocity(merged_pipe)
    finally:
        reset_lycoris_preset()
    assert len(network.loras) == 16
    assert not torch.equal(merged, base)
    assert torch.allclose(merged, trained, atol=1e-4)
    # The adapter's effect on the prediction stands clear of the float error of merging.
    effect = float((merged_velocity - base_velocity).abs().max())
    assert effect > 10 * float((merged_velocity - trained_velocity).abs().max())


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(runs, pickle_payload):
    root, config = runs["root"], str(runs["config"])
    workdir = root / "E"
    lokr_job("run", "--config", config, "--workdir", str(workdir), "--set", "max_train_steps=8")
    checkpoint = workdir / "checkpoints" / "checkpoint-00000008"
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.save({**optimizer, "hook": pickle_payload}, checkpoint / "optimizer.pt")
    write_marker(checkpoint, 8)  # whoever changed the file can rewrite the marker too
    output = (workdir / "output" / RESULT_FILE).read_bytes()
    env = {**os.environ, "LOKR_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "job", "run", "--config", config, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "optimizer.pt names posix.system" in result.stderr
    assert not pickle_payload.proof.exists()
    assert checkpoint.is_dir(), "left in place for the user to inspect, not set aside or deleted"
    assert (workdir / "output" / RESULT_FILE).read_bytes() == output, "nothing trained past the refusal"
