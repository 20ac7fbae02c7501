"""Group offload's disk files and config: written once (ahead of training by ``warm_only``), reused while
the weights hash the same, rewritten where they changed; and the flags resolved as the seed describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_offload_training import CPU, assert_identical, job_config, tiny_model, train

from job.errors import ConfigError
from job.model.offload.apply import apply_group_offload
from job.model.offload.settings import offload_settings
from job.model.offload.store import MANIFEST
from job.model.offload.tensors import OffloadedTensor

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread")


def disk_job(path: Path, **overrides: object):
    return job_config(
        base_model_precision="int8-quanto",
        enable_group_offload=True,
        group_offload_to_disk_path=str(path),
        **overrides,
    )


def files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every group file with its inode and modification time: what a rewrite would change."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.safetensors")}


def test_files_are_written_once_and_reused(tmp_path):
    job = disk_job(tmp_path / "spill")
    transformer, _ = tiny_model("int8-quanto")
    first = apply_group_offload(transformer, job, tmp_path, CPU)
    assert sorted(first.disk.written) == sorted(g.name for g in first.groups) and not first.disk.reused
    written = files(tmp_path / "spill")
    manifest = json.loads((tmp_path / "spill" / MANIFEST).read_text())
    assert sorted(f"{name}.safetensors" for name in manifest["groups"]) == sorted(written)

    transformer, _ = tiny_model("int8-quanto")
    second = apply_group_offload(transformer, job, tmp_path, CPU)
    assert second.disk.written == [] and len(second.disk.reused) == len(second.groups)
    assert files(tmp_path / "spill") == written


def test_warm_only_writes_the_files_and_leaves_the_model_alone(tmp_path):
    job = disk_job(tmp_path / "spill", group_offload_type="leaf_level")
    transformer, network = tiny_model("int8-quanto")
    warm = apply_group_offload(transformer, job, tmp_path, CPU, warm_only=True)
    assert not warm.installed and len(warm.disk.written) == len(warm.groups) > 0
    assert not any(isinstance(t, OffloadedTensor) for t in transformer.parameters())
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    expected = train(transformer, network)

    # The training process: a fresh model, the files already there.
    transformer, network = tiny_model("int8-quanto")
    written = files(tmp_path / "spill")
    offload = apply_group_offload(transformer, job, tmp_path, CPU)
    assert offload.disk.written == [] and files(tmp_path / "spill") == written
    assert_identical(train(transformer, network), expected)


def test_a_changed_base_weight_rewrites_its_group_and_trains_on_the_new_weights(tmp_path):
    job = disk_job(tmp_path / "spill")
    transformer, _ = tiny_model("int8-quanto")
    apply_group_offload(transformer, job, tmp_path, CPU)
    before = files(tmp_path / "spill")

    # Another base model in the same folder: a different weight in one block only.
    transformer, network = tiny_model("int8-quanto")
    weight = transformer.single_transformer_blocks[1].ff.linear_1.weight
    weight._data[0, 0] = weight._data[0, 0] + 1
    expected = train(transformer, network)
    transformer, network = tiny_model("int8-quanto")
    weight = transformer.single_transformer_blocks[1].ff.linear_1.weight
    weight._data[0, 0] = weight._data[0, 0] + 1
    offload = apply_group_offload(transformer, job, tmp_path, CPU)
    assert offload.disk.written == ["single_transformer_blocks.1"]
    after = files(tmp_path / "spill")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"single_transformer_blocks.1.safetensors"}
    assert_identical(train(transformer, network), expected)


def test_a_new_grouping_replaces_the_old_files(tmp_path):
    transformer, _ = tiny_model("int8-quanto")
    apply_group_offload(transformer, disk_job(tmp_path / "spill"), tmp_path, CPU)
    transformer, _ = tiny_model("int8-quanto")
    regrouped = disk_job(tmp_path / "spill", group_offload_blocks_per_group=2)
    offload = apply_group_offload(transformer, regrouped, tmp_path, CPU)
    names = sorted(g.name for g in offload.groups)
    assert names == ["joint_transformer_blocks.0", "single_transformer_blocks.0-1"]
    assert sorted(offload.disk.removed) == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert sorted(files(tmp_path / "spill")) == [f"{name}.safetensors" for name in names]


def test_a_damaged_manifest_means_rewriting(tmp_path):
    transformer, _ = tiny_model("int8-quanto")
    job = disk_job(tmp_path / "spill")
    apply_group_offload(transformer, job, tmp_path, CPU)
    (tmp_path / "spill" / MANIFEST).write_text("{not json")
    transformer, _ = tiny_model("int8-quanto")
    offload = apply_group_offload(transformer, job, tmp_path, CPU)
    assert len(offload.disk.written) == len(offload.groups)


def test_settings_follow_the_seed(tmp_path):
    job = job_config(enable_group_offload=True, group_offload_use_stream=True)
    ram = offload_settings(job, tmp_path, CPU)
    assert ram.disk_dir is None and ram.use_stream is False  # no CUDA here: streams silently off
    assert ram.offload_type == "block_level" and ram.blocks_per_group == 1
    cuda = offload_settings(job, tmp_path, torch.device("cuda"))
    assert cuda.use_stream is True
    relative = job_config(enable_group_offload=True, group_offload_to_disk_path="spill")
    assert offload_settings(relative, tmp_path, CPU).disk_dir == tmp_path / "spill"
    absolute = job_config(enable_group_offload=True, group_offload_to_disk_path=str(tmp_path / "nvme"))
    assert offload_settings(absolute, tmp_path / "elsewhere", CPU).disk_dir == tmp_path / "nvme"


def test_nothing_happens_unless_enabled(tmp_path):
    transformer, _ = tiny_model()
    assert apply_group_offload(transformer, job_config(), tmp_path, CPU) is None
    assert not any(isinstance(t, OffloadedTensor) for t in transformer.parameters())


def test_full_rank_training_is_pointed_at_deepspeed(tmp_path):
    job = job_config(model_type="full", deepspeed_config="ds_config.json", enable_group_offload=True)
    with pytest.raises(ConfigError, match="deepspeed_config"):
        apply_group_offload(tiny_model()[0], job, tmp_path, CPU)


@pytest.mark.slow
def test_warm_writes_the_files_and_train_only_checks_them(tiny_job: Path, tmp_path: Path) -> None:
    """What an init container (or an earlier ``lokr-job warm``) pays for, ``train`` does not pay again."""
    settings = [
        "enable_group_offload=true",
        "group_offload_to_disk_path=spill",
        "base_model_precision=int8-quanto",
    ]
    args = ["--config", str(tiny_job), "--workdir", str(tmp_path / "work"), "--set", "max_train_steps=2"]
    args += [arg for setting in settings for arg in ("--set", setting)]
    env = {**os.environ, "LOKR_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}

    def lokr_job(command: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "job", command, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    warmed = lokr_job("warm")
    spill = tmp_path / "work" / "offload" / "spill"
    written = files(spill)
    assert written and (spill / MANIFEST).is_file()
    assert f"group-offload files in {spill}: {len(written)} written, 0 valid already" in warmed
    trained = lokr_job("train")
    assert f"group offload: {spill}: 0 files written, {len(written)} reused" in trained
    assert files(spill) == written  # same inodes, same modification times: nothing rewritten
    assert "step 2/2" in trained
