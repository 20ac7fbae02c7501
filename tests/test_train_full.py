"""Full-rank training (``model_type: full``) with DeepSpeed ZeRO through the real CLI, on the CPU: every
weight trains, an interrupted run (stopped, or preempted by SIGTERM) resumes to the same bytes, two
processes shard ZeRO-3 and refuse to be resumed by one, and the config's mistakes are named up front."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from job.config.loader import load_config
from job.errors import ConfigError, DataError, ExitCode
from job.train.checkpoint import list_checkpoints, verify
from job.train.output import RESULT_FILE, TRANSFORMER_DIR
from job.train.pickles import refuse_pickled_code
from job.train.remote import remote_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import chaos

# DeepSpeed is the optional deepspeed extra (in the dev extra, so CI has it).
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed"
)

LAUNCH = Path(__file__).parents[1] / "docker" / "launch.py"
ZERO_2 = {
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero_force_ds_cpu_optimizer": False,
}
ZERO_3 = {"zero_optimization": {"stage": 3}}
WEIGHTS = f"{TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors"


def environment() -> dict[str, str]:
    # One torch thread: the tiny model gains nothing from more, and a busy CI box makes them crawl.
    env = {**os.environ, "LOKR_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def lokr_job(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "job", *args], capture_output=True, text=True, env=environment(), timeout=600
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def full_rank_config(job_dir: Path, deepspeed: dict[str, object], name: str, **settings: object) -> Path:
    """The tiny job's config turned full-rank: ZeRO config ``name``, accumulation 2 and a warm-up."""
    (job_dir / "config" / f"{name}.json").write_text(json.dumps(deepspeed))
    config = json.loads((job_dir / "config" / "config.json").read_text())
    config.pop("lycoris_config")
    config.update(
        {
            "model_type": "full",
            "deepspeed_config": f"config/{name}.json",
            "max_train_steps": 6,
            "checkpoint_step_interval": 3,
            "gradient_accumulation_steps": 2,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 2,
            **settings,
        }
    )
    path = job_dir / "config" / f"config-{name}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full")
    lokr_job("tiny", str(root / "job"))
    return root / "job"


@pytest.fixture(scope="module")
def zero2(job_dir: Path) -> dict[str, Path]:
    """A: 6 steps in one go. B: stopped at 3, then run again to 6."""
    config = full_rank_config(job_dir, ZERO_2, "zero2")
    root = job_dir.parent
    lokr_job("run", "--config", str(config), "--workdir", str(root / "A"))
    lokr_job("run", "--config", str(config), "--workdir", str(root / "B"), "--set", "max_train_steps=3")
    resumed = lokr_job("run", "--config", str(config), "--workdir", str(root / "B"))
    (root / "B-resume.log").write_text(resumed.stderr)
    return {"A": root / "A", "B": root / "B", "config": config}


@pytest.mark.slow
@needs_deepspeed
def test_every_weight_trains_and_the_output_is_a_diffusers_transformer(zero2, job_dir):
    from diffusers import AuraFlowTransformer2DModel

    base = load_file(str(job_dir / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(zero2["A"] / "output" / WEIGHTS))
    assert trained.keys() == base.keys()
    changed = [name for name in base if not (trained[name] == base[name]).all()]
    assert len(changed) == len(base), sorted(set(base) - set(changed))
    record = json.loads((zero2["A"] / "output" / RESULT_FILE).read_text())
    assert record["model_type"] == "full" and record["step"] == 6
    assert WEIGHTS in record["files"]
    model = AuraFlowTransformer2DModel.from_pretrained(zero2["A"] / "output" / TRANSFORMER_DIR)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in base.values())


@pytest.mark.slow
@needs_deepspeed
def test_a_stopped_run_resumes_to_the_same_bytes(zero2):
    log = (zero2["B"].parent / "B-resume.log").read_text()
    assert "resumed from" in log and "checkpoint-00000003 (step 3" in log
    assert (zero2["A"] / "output" / WEIGHTS).read_bytes() == (zero2["B"] / "output" / WEIGHTS).read_bytes()
    for _, checkpoint in list_checkpoints(zero2["B"] / "checkpoints"):
        assert verify(checkpoint) is None
        assert (checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()


@pytest.mark.slow
@needs_deepspeed
def test_a_zero_shard_carrying_a_pickle_payload_is_refused_before_deepspeed_loads_it(zero2, pickle_payload):
    """DeepSpeed unpickles its shards with weights_only=False: its own classes pass the check, a planted
    callable does not, and nothing runs."""
    _, newest = list_checkpoints(zero2["B"] / "checkpoints")[-1]
    checkpoint = shutil.copytree(newest, pickle_payload.proof.parent / newest.name)
    refuse_pickled_code(checkpoint)
    shard = checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(shard, weights_only=False)  # the file the test run just wrote
    torch.save({**state, "hook": pickle_payload}, shard)
    with pytest.raises(DataError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt names posix\.system"):
        refuse_pickled_code(checkpoint)
    assert not pickle_payload.proof.exists()


@pytest.mark.slow
@needs_deepspeed
def test_a_finished_full_rank_run_is_not_redone(zero2):
    result = lokr_job("train", "--config", str(zero2["config"]), "--workdir", str(zero2["A"]))
    assert "already holds this config's weights at step 6" in result.stderr


@pytest.mark.slow
@needs_deepspeed
def test_a_preempted_run_continues_on_a_fresh_machine_from_the_run_uri(zero2, job_dir, s3):
    """SIGTERM mid-run: exit 75 with a checkpoint uploaded; a new machine (empty work directory) takes the
    checkpoint from the run URI and ends with the uninterrupted run's bytes."""
    env, run_uri = chaos.job_env(), s3.uri("run")
    kill = chaos.Kill(signal.SIGTERM, "step", chaos._STEP, occurrence=4, delay=0.0)
    first = chaos.job_command(zero2["config"], job_dir.parent / "first", run_uri, overrides=())
    stopped = chaos.run_attempt(first, env, kill)
    assert stopped.killed and stopped.returncode == ExitCode.TRANSIENT, stopped.log[-3000:]
    assert stopped.last_step is not None and stopped.last_step >= 4
    assert remote_checkpoints(run_uri).get(stopped.last_step) is True

    second = chaos.job_command(zero2["config"], job_dir.parent / "second", run_uri, overrides=())
    resumed = chaos.run_attempt(second, env, None)
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert resumed.resumed_from == stopped.last_step
    produced = (job_dir.parent / "second" / "output" / WEIGHTS).read_bytes()
    assert produced == (zero2["A"] / "output" / WEIGHTS).read_bytes()


@pytest.mark.slow
@needs_deepspeed
def test_two_processes_shard_zero_3_and_one_process_cannot_resume_them(job_dir):
    config = full_rank_config(job_dir, ZERO_3, "zero3", max_train_steps=4, checkpoint_step_interval=2)
    workdir = job_dir.parent / "two"
    command = [sys.executable, str(LAUNCH), "--standalone", "--nproc-per-node", "2", "--no-python",
               sys.executable, "-m", "job", "run", "--config", str(config), "--workdir", str(workdir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "validation images and eval loss are off: ZeRO-3 on 2 processes" in result.stderr
    newest = list_checkpoints(workdir / "checkpoints")[-1][1]
    shards = sorted(p.name for p in (newest / "pytorch_model").glob("*optim_states.pt"))
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (workdir / "output" / WEIGHTS).is_file()

    more = lokr_job(
        "train", "--config", str(config), "--workdir", str(workdir), "--set", "max_train_steps=6",
        expect=ExitCode.BAD_CONFIG,
    )  # fmt: skip
    assert "holds ZeRO shards of 2 process(es), this run has 1: run with 2 processes" in more.stderr


@pytest.mark.parametrize(
    "settings, deepspeed, expected",
    [
        ({"deepspeed_config": None}, ZERO_2, "set deepspeed_config to a DeepSpeed ZeRO stage 2 or 3"),
        ({"base_model_precision": "int8-quanto"}, ZERO_2, "cannot be trained full-rank"),
        ({"use_ema": True}, ZERO_2, "use_ema works with model_type lora only"),
        (
            {},
            {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
            "stage3_gather_16bit_weights_on_model_save: false",
        ),
        ({"enable_group_offload": True}, ZERO_2, "cannot be combined: ZeRO shards the weights"),
    ],
)
def test_full_rank_mistakes_are_named_when_the_config_loads(job_dir, settings, deepspeed, expected):
    config = full_rank_config(job_dir, deepspeed, "mistake")
    raw = json.loads(config.read_text())
    raw.update(settings)
    raw = {key: value for key, value in raw.items() if value is not None}
    config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(config)
    assert caught.value.exit_code == ExitCode.BAD_CONFIG


def test_regularisation_data_is_refused_for_full_rank(job_dir):
    config = full_rank_config(job_dir, ZERO_2, "regularisation")
    backends = json.loads((job_dir / "config" / "multidatabackend.json").read_text())
    for backend in backends:
        if backend.get("dataset_type", "image") == "image":
            backend["is_regularisation_data"] = True
    (job_dir / "config" / "backends-regularisation.json").write_text(json.dumps(backends))
    raw = json.loads(config.read_text())
    raw["data_backend_config"] = "config/backends-regularisation.json"
    config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="is_regularisation_data needs model_type lora"):
        load_config(config)


@pytest.mark.slow
@needs_deepspeed
def test_check_estimates_full_rank_memory_per_gpu(job_dir):
    result = lokr_job("check", "--config", str(full_rank_config(job_dir, ZERO_2, "check")))
    assert "full-rank, ZeRO-2 over 1 GPU(s)" in result.stdout


def test_the_full_size_estimate_follows_zero_sharding(job_dir):
    from job.check.estimate import GIB, transformer_config, vram_estimate

    config, source = transformer_config(None)
    zero3 = {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }
    cfg = load_config(
        full_rank_config(job_dir, zero3, "estimate", base_model_precision="bf16", mixed_precision="bf16")
    )
    one, eight = (vram_estimate(cfg, config, source, (1024, 1024), world_size=n) for n in (1, 8))
    assert 12 * GIB < one.weights_bytes < 15 * GIB  # 6.8B in bf16, plus two gathered blocks
    assert eight.weights_bytes < one.weights_bytes / 4
    assert one.optimizer_bytes == 0  # offloaded to the CPU
    assert eight.adapter_bytes * 8 == pytest.approx(one.adapter_bytes, rel=1e-6)
    assert "ZeRO-3 over 8 GPU(s)" in eight.training


def test_check_names_a_missing_deepspeed_before_training(job_dir, monkeypatch, tmp_path):
    from job.check.run import build_report
    from job.context import open_context

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a),
    )
    ctx = open_context(str(full_rank_config(job_dir, ZERO_2, "absent")), tmp_path / "work", None, [])
    problems = [text for code, text in build_report(ctx).problems if code == ExitCode.BAD_CONFIG]
    assert any("lokr-job[deepspeed]" in text for text in problems), problems


@pytest.mark.slow
@needs_deepspeed
def test_processes_that_do_not_share_the_work_directory_are_refused(job_dir):
    """Two machines, each with its own work directory, stand-in: each rank gets a work directory of its own
    (both warmed beforehand). ZeRO shards of both ranks must land in one checkpoint folder, so the job
    refuses at the start instead of writing checkpoints no machine holds whole."""
    config = full_rank_config(job_dir, ZERO_2, "apart")
    for rank in (0, 1):
        lokr_job("warm", "--config", str(config), "--workdir", str(job_dir.parent / f"apart-{rank}"))
    per_rank = f'exec "$0" -m job train --config {config} --workdir {job_dir.parent}/apart-"$LOCAL_RANK"'
    command = [sys.executable, str(LAUNCH), "--standalone", "--nproc-per-node", "2", "--no-python",
               "sh", "-c", per_rank, sys.executable]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-4000:]
    assert "some processes do not see the folder rank 0 writes" in result.stderr
    assert not list_checkpoints(job_dir.parent / "apart-0" / "checkpoints")
