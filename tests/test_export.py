"""lokr-job export --format merged: the base transformer with the adapter merged in, in diffusers' layout,
computing what the training forward computes (as ``infer``'s merge does), loadable by diffusers; --format comfyui:
the adapter under the keys ComfyUI maps for AuraFlow, which ComfyUI's LoKr patch turns into the same change."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lokr_fixtures import write_random_adapter

from job.config.loader import load_config
from job.config.schema import LycorisConfig
from job.errors import ExitCode
from job.files import sha256_file
from job.publish.export import merge_adapter

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


@pytest.fixture(scope="module")
def low_rank_adapter(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kronecker factors whose second one is low-rank (lokr_w2_a @ lokr_w2_b), scaled by alpha / rank."""
    lycoris = LycorisConfig.model_validate({"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4})
    path = tmp_path_factory.mktemp("low-rank") / "adapter.safetensors"
    return write_random_adapter(model, lycoris, path, std=0.1)


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
    }


def trained_output(model: Path, adapter: Path, scale: float) -> torch.Tensor:
    """The base transformer with the adapter running beside its layers, as in training, at ``scale``."""
    from diffusers import AuraFlowTransformer2DModel
    from lycoris import create_lycoris_from_weights

    transformer = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    network, _ = create_lycoris_from_weights(scale, str(adapter), transformer)
    network.apply_to()
    network.eval()
    with torch.no_grad():
        return transformer(**_inputs()).sample


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seed", "low_rank"])
def test_the_merged_transformer_computes_what_training_did_and_loads_in_diffusers(
    model: Path, kind: str, request: pytest.FixtureRequest, tmp_path: Path
):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    adapter = request.getfixturevalue("adapter" if kind == "seed" else "low_rank_adapter")

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
        assert torch.equal(exported_out, merged(**_inputs()).sample)  # infer renders with the same merge
        assert torch.allclose(exported_out, trained_output(model, adapter, 0.75), rtol=1e-4, atol=1e-4)
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


# The diffusers-side module names ComfyUI maps to its own AuraFlow weights (comfy/utils.py,
# auraflow_to_diffusers, read by comfy/lora.py for "transformer.<name>" keys), per block kind.
COMFYUI_JOINT = {
    *(f"attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")),
    "attn.to_add_out",
    *(f"{ff}.{n}" for ff in ("ff", "ff_context") for n in ("linear_1", "linear_2", "out_projection")),
    "norm1.linear",
    "norm1_context.linear",
}
COMFYUI_SINGLE = {
    *(f"attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")),
    *(f"ff.{n}" for n in ("linear_1", "linear_2", "out_projection")),
    "norm1.linear",
}
COMFYUI_BASIC = {"time_step_proj.linear_1", "time_step_proj.linear_2", "context_embedder", "pos_embed.proj"}
COMFYUI_BASIC |= {"proj_out", "norm_out.linear"}


def comfyui_maps(name: str) -> bool:
    kind, _, rest = name.partition(".")
    index, _, inner = rest.partition(".")
    if kind == "joint_transformer_blocks" and index.isdigit():
        return inner in COMFYUI_JOINT
    if kind == "single_transformer_blocks" and index.isdigit():
        return inner in COMFYUI_SINGLE
    return name in COMFYUI_BASIC


def comfyui_patch(transformer: torch.nn.Module, lora: dict[str, torch.Tensor], strength: float) -> None:
    """What ComfyUI's LoKr patch adds to each weight: strength · kron(w1, w2), times alpha / rank where a
    factor is low-rank (comfy/weight_adapter/lokr.py)."""
    modules = dict(transformer.named_modules())
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        name, part_name = key.removeprefix("transformer.").rsplit(".", 1)
        grouped.setdefault(name, {})[part_name] = value
    for name, part in grouped.items():
        rank, w1, w2 = None, part.get("lokr_w1"), part.get("lokr_w2")
        if w1 is None:
            rank, w1 = part["lokr_w1_b"].shape[0], part["lokr_w1_a"] @ part["lokr_w1_b"]
        if w2 is None:
            rank, w2 = part["lokr_w2_b"].shape[0], part["lokr_w2_a"] @ part["lokr_w2_b"]
        alpha = part["alpha"].item() / rank if rank is not None else 1.0
        weight = modules[name].weight
        with torch.no_grad():
            weight += (strength * alpha) * torch.kron(w1, w2).reshape(weight.shape)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seed", "low_rank"])
def test_the_comfyui_file_names_auraflow_modules_and_patches_what_training_computed(
    model: Path, kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from diffusers import AuraFlowTransformer2DModel
    from safetensors.torch import load_file

    adapter = request.getfixturevalue("adapter" if kind == "seed" else "low_rank_adapter")

    out = tmp_path / "comfy"
    args = ("--base-model", str(model), "--adapter", str(adapter), "--out", str(out))
    result = lokr_job("export", "--format", "comfyui", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lora = load_file(out / "lokr-comfyui.safetensors")
    trained = load_file(adapter)
    assert len(lora) == len(trained)
    base = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for key in lora:
        name, part = key.removeprefix("transformer.").rsplit(".", 1)
        assert key.startswith("transformer.") and name in linear and comfyui_maps(name), key
        assert part in {"alpha", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
        assert torch.equal(lora[key], trained[f"lycoris_{name.replace('.', '_')}.{part}"])
    patched = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    comfyui_patch(patched, lora, 0.75)
    with torch.no_grad():
        patched_out = patched(**_inputs()).sample
        assert torch.allclose(patched_out, trained_output(model, adapter, 0.75), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(patched_out, base(**_inputs()).sample, atol=1e-3)


def test_lycoris_options_comfyui_would_apply_differently_are_refused(
    model: Path, adapter: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        settings = json.loads(handle.metadata()["lycoris_config"])
    rs_lora = tmp_path / "rs.safetensors"
    save_file(tensors, str(rs_lora), metadata={"lycoris_config": json.dumps({**settings, "rs_lora": True})})
    result = lokr_job(
        "export", "--format", "comfyui", "--base-model", str(model), "--adapter", str(rs_lora),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "rs_lora: true" in result.stderr and "--format merged" in result.stderr
    assert not (tmp_path / "out").exists()
