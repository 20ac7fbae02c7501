"""Full-rank training's DeepSpeed config: checked up front with errors that name file and key, handed to
accelerate's DeepSpeedPlugin, and DeepSpeed's absence reported as a config problem, not a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from job.config import deepspeed as ds
from job.config.schema import JobConfig
from job.errors import ConfigError, ExitCode
from job.model.deepspeed import deepspeed_plugin, require_deepspeed

STAGE_2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
STAGE_3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"},
    },
    "zero_force_ds_cpu_optimizer": False,
    "bf16": {"enabled": "auto"},
}


def full_job(config_path: Path, **overrides: object) -> JobConfig:
    settings: dict[str, object] = {
        "data_backend_config": "multidatabackend.json",
        "max_train_steps": 10,
        "model_type": "full",
        "deepspeed_config": str(config_path),
        "grad_clip_method": "norm",
        "max_grad_norm": 1.0,
    }
    settings.update(overrides)
    return JobConfig.model_validate(settings)


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "ds_config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def problems_of(tmp_path: Path, config: object, **overrides: object) -> str:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as caught:
        ds.load_deepspeed_config(full_job(path, **overrides))
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert all(problem.startswith(f"{path}: ") for problem in caught.value.problems)
    return caught.value.message


def test_stage_2_and_stage_3_with_offload_are_accepted(tmp_path):
    settings = ds.load_deepspeed_config(full_job(write(tmp_path, STAGE_2)))
    assert (settings.stage, settings.offload_optimizer, settings.offload_param) == (2, "none", "none")
    settings = ds.load_deepspeed_config(full_job(write(tmp_path, STAGE_3_OFFLOAD)))
    assert (settings.stage, settings.offload_optimizer, settings.offload_param) == (3, "cpu", "nvme")


def test_pasted_json_with_trailing_commas_is_read(tmp_path):
    text = '{\n  "zero_optimization": {"stage": 2,},\n  // a comment\n}\n'
    assert ds.load_deepspeed_config(full_job(write(tmp_path, text))).stage == 2


@pytest.mark.parametrize(
    "config, overrides, key",
    [
        ({"zero_optimization": {"stage": 1}}, {}, "zero_optimization.stage: 1"),
        ({"zero_optimization": {"stage": "auto"}}, {}, "zero_optimization.stage: 'auto'"),
        ({"train_batch_size": 8}, {}, "zero_optimization: missing"),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            {},
            "zero_optimization.offload_param: parameters are offloaded only by ZeRO stage 3",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            {},
            "zero_optimization.offload_param.nvme_path: required",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
            {},
            "zero_optimization.offload_param.device: 'gpu'",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": "yes"}}},
            {},
            "zero_optimization.offload_optimizer.pin_memory: 'yes'",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            {},
            "zero_force_ds_cpu_optimizer: set it to false",
        ),
        ({**STAGE_2, "optimizer": {"type": "AdamW"}}, {}, "optimizer: remove it"),
        ({**STAGE_2, "train_micro_batch_size_per_gpu": 4}, {}, "train_micro_batch_size_per_gpu: 4"),
        ({**STAGE_2, "gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps: 2"),
        ({**STAGE_2, "gradient_clipping": 0.5}, {}, 'gradient_clipping: use "auto"'),
        ({**STAGE_2, "fp16": {"enabled": True}}, {}, "fp16.enabled: true"),
        (STAGE_2, {"grad_clip_method": "value"}, "grad_clip_method to norm"),
        (
            STAGE_2,
            {"model_type": "lora", "lycoris_config": "l.json"},
            "deepspeed_config is for model_type full",
        ),
        (STAGE_2, {"enable_group_offload": True}, "cannot be combined"),
    ],
)
def test_each_problem_names_its_key(tmp_path, config, overrides, key):
    assert key in problems_of(tmp_path, config, **overrides)


def test_every_problem_is_reported_at_once(tmp_path):
    message = problems_of(
        tmp_path,
        {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "tape"}}, "scheduler": {}},
    )
    assert "3 problems" in message
    for key in ("zero_optimization.stage", "zero_optimization.offload_optimizer.device", "scheduler"):
        assert key in message


@pytest.mark.parametrize(
    "content, expected",
    [('{\n  "zero_optimization": {\n    stage: [\n}', "not valid JSON"), ("[2, 3]", "must hold an object")],
)
def test_unreadable_files_are_config_errors(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError, match=expected) as caught:
        ds.load_deepspeed_config(full_job(path))
    assert str(path) in caught.value.message


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        ds.load_deepspeed_config(full_job(tmp_path / "absent.json"))


def test_the_accelerate_plugin_carries_the_config(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ACCELERATE_"):
            monkeypatch.delenv(name)
    plugin = deepspeed_plugin(full_job(write(tmp_path, STAGE_3_OFFLOAD), max_grad_norm=0.01))
    assert plugin.zero_stage == 3
    assert plugin.offload_optimizer_device == "cpu" and plugin.offload_param_device == "nvme"
    assert plugin.zero3_init_flag is True
    assert plugin.deepspeed_config["gradient_clipping"] == 0.01
    assert plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False

    job = full_job(write(tmp_path, STAGE_2), gradient_accumulation_steps=4, train_batch_size=2)
    plugin = deepspeed_plugin(job)
    assert plugin.zero_stage == 2 and plugin.zero3_init_flag is False
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2


def test_deepspeed_missing_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"lokr-job\[deepspeed\]"):
        require_deepspeed()


# Run in a process of its own: DeepSpeed initialises torch.distributed. argv[1] is the job's config.
ZERO_STEPS = """
import json, sys, torch
from accelerate import Accelerator
from job.config.schema import JobConfig
from job.model.deepspeed import deepspeed_plugin, require_deepspeed
from job.model.tiny import build_transformer

def losses(accelerator):
    torch.manual_seed(0)
    model = build_transformer().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(3):
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        text = torch.randn(1, 6, 32, generator=generator)
        timestep = torch.rand(1, generator=generator)
        loss = model(latents, encoder_hidden_states=text, timestep=timestep).sample.pow(2).mean()
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(loss.item())
    return seen

job = JobConfig.model_validate_json(open(sys.argv[1]).read())
require_deepspeed()
plain = losses(None)
zero = losses(Accelerator(deepspeed_plugin=deepspeed_plugin(job), mixed_precision="no"))
print(json.dumps({"plain": plain, "zero": zero}))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed"
)
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_full_rank_steps_through_zero_on_the_cpu(tmp_path, stage):
    """Three ZeRO steps of the tiny AuraFlow, optimizer offloaded to the CPU: the losses match plain AdamW's."""
    config = {
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(full_job(write(tmp_path, config), mixed_precision="no").model_dump_json())
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    result = subprocess.run(
        [sys.executable, "-c", ZERO_STEPS, str(job_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["zero"] == pytest.approx(seen["plain"], rel=1e-4)
    assert seen["zero"][-1] < seen["zero"][0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
