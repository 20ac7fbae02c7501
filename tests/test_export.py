"""lokr-job export --format merged: the base transformer with the adapter merged in, in diffusers' layout,
computing exactly what ``infer``'s merge computes, and loadable by diffusers as a pipeline's transformer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lokr_fixtures import write_random_adapter

from job.config.loader import load_config
from job.errors import ExitCode
from job.files import sha256_file
from job.infer import merge_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lokr_job(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tiny_job: Path) -> Path:
    return tiny_job.parent.parent / "model"


@pytest.fixture(scope="module")
def adapter(tiny_job: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    return write_random_adapter(
        model, load_config(tiny_job).lycoris, folder / "pytorch_lora_weights.safetensors"
    )


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
    }


@pytest.mark.slow
def test_the_merged_transformer_is_infers_merge_and_loads_in_diffusers(
    model: Path, adapter: Path, tmp_path: Path
):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    out = tmp_path / "merged"
    result = lokr_job(
        "export", "--format", "merged", "--base-model", str(model), "--adapter", str(adapter),
        "--scale", "0.75", "--dtype", "fp32", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)
    record = json.loads((out / "export.json").read_text())
    assert record == {
        "format": "merged",
        "base_model": str(model),
        "adapter_sha256": sha256_file(adapter),
        "scale": 0.75,
        "dtype": "fp32",
    }
    exported = AuraFlowTransformer2DModel.from_pretrained(out / "transformer")
    merged = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    base = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    merge_adapter(merged, adapter, 0.75)
    with torch.no_grad():
        exported_out = exported(**_inputs()).sample
        assert torch.equal(exported_out, merged(**_inputs()).sample)
        assert not torch.allclose(exported_out, base(**_inputs()).sample, atol=1e-3)  # the adapter counts
    pipeline = AuraFlowPipeline.from_pretrained(model, transformer=exported)
    assert pipeline.transformer is exported


def test_a_full_rank_config_or_nothing_to_export_is_a_config_error(tiny_job: Path, tmp_path: Path) -> None:
    result = lokr_job("export", "--format", "merged", "--out", str(tmp_path / "x"))
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "--base-model and --adapter" in result.stderr
    deepspeed = tmp_path / "ds.json"
    deepspeed.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    full = ("--set", "model_type=full", "--set", f"deepspeed_config={deepspeed}")
    result = lokr_job(
        "export", "--format", "merged", "--config", str(tiny_job), "--workdir", str(tmp_path), *full
    )
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "already is a whole transformer" in result.stderr
    assert not (tmp_path / "output" / "export-merged").exists()
