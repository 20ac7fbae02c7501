"""Loading and preparing the base transformer: sources, precisions, quantize-then-LoKr, checkpointing."""

from pathlib import Path

import pytest
import torch

from job.config.schema import JobConfig, LycorisConfig
from job.errors import ConfigError
from job.model.lokr import attach_lokr
from job.model.tiny import build_transformer
from job.model.transformer import load_dtype, load_transformer, prepare_base_model

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset")

LYCORIS = LycorisConfig.model_validate(
    {
        "factor": 16,
        "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 8}}},
    }
)
CPU = torch.device("cpu")


def _job(**settings) -> JobConfig:
    return JobConfig(data_backend_config="x.json", lycoris_config="l.json", max_train_steps=1, **settings)


def _transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer()


def test_loads_from_a_pipeline_folder_and_from_a_transformer_folder(tiny_job: Path, tmp_path: Path):
    model = tiny_job.parent.parent / "model"
    transformer = load_transformer(model)
    assert transformer.config.num_single_dit_layers == 2
    transformer.save_pretrained(tmp_path / "only-transformer")
    again = load_transformer(tmp_path / "only-transformer", dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16


def test_a_folder_without_a_transformer_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path"):
        load_transformer(tmp_path / "missing")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ConfigError, match="cannot load the AuraFlow transformer"):
        load_transformer(tmp_path)


def test_group_offload_leaves_the_transformer_where_it_is():
    job = _job(base_model_precision="int8-quanto", enable_group_offload=True)
    transformer = prepare_base_model(_transformer(), job, torch.device("meta"))
    assert {p.device.type for p in transformer.parameters()} == {"cpu"}


def test_load_dtype_is_simpletuners_weight_dtype():
    """SimpleTuner: simpletuner/helpers/configuration/cmd_args.py ``parse_cmdline_args`` sets weight_dtype to
    bf16 under mixed_precision bf16, and for a quantized model (base_model_default_dtype bf16), else fp32;
    ``ModelFoundation.load_model`` (simpletuner/helpers/models/common.py) loads the transformer in it."""
    assert load_dtype(_job(base_model_precision="no_change")) == torch.bfloat16
    assert load_dtype(_job(base_model_precision="no_change", mixed_precision="no")) == torch.float32
    for precision in ("bf16", "int8-quanto", "int4-quanto"):
        for mixed in ("bf16", "no"):
            assert load_dtype(_job(base_model_precision=precision, mixed_precision=mixed)) == torch.bfloat16


@pytest.mark.parametrize(
    ("precision", "mixed", "expected"),
    [
        ("no_change", "no", torch.float32),
        ("no_change", "bf16", torch.bfloat16),
        ("bf16", "no", torch.bfloat16),
    ],
)
def test_plain_precisions_freeze_and_cast(precision, mixed, expected):
    job = _job(base_model_precision=precision, mixed_precision=mixed, gradient_checkpointing=True)
    transformer = prepare_base_model(_transformer(), job, CPU)
    assert {p.dtype for p in transformer.parameters()} == {expected}
    assert not any(p.requires_grad for p in transformer.parameters())
    assert transformer.gradient_checkpointing


@pytest.mark.parametrize("via", ["cpu", "accelerator"])
def test_int8_quanto_then_lokr_trains_the_adapter_in_bypass_mode(via):
    from optimum.quanto import QLinear

    job = _job(base_model_precision="int8-quanto", quantize_via=via)
    transformer = prepare_base_model(_transformer(), job, CPU)
    assert any(isinstance(m, QLinear) for m in transformer.modules())
    assert not any(p.requires_grad for p in transformer.parameters())
    assert load_dtype(job) == torch.bfloat16

    network = attach_lokr(transformer, LYCORIS, seed=0)
    assert len(network.loras) == 16
    assert all(lora.bypass_mode for lora in network.loras)
    out = transformer(
        hidden_states=torch.randn(1, 4, 8, 8, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, 32, dtype=torch.bfloat16),
        timestep=torch.tensor([0.3]),
        return_dict=False,
    )[0]
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_int8_torchao_then_lokr_trains_the_adapter_alone():
    """torchao keeps nn.Linear with an int8 tensor as its weight: the LoKr runs in bypass mode beside it."""
    from torchao.quantization import Int8Tensor

    job = _job(base_model_precision="int8-torchao")
    transformer = prepare_base_model(_transformer(), job, CPU)
    assert isinstance(transformer.joint_transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    network = attach_lokr(transformer, LYCORIS, seed=0)
    assert all(lora.bypass_mode for lora in network.loras)
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator).bfloat16(),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=generator).bfloat16(),
        "timestep": torch.tensor([0.3, 0.7]),
    }
    target = torch.randn(2, 4, 8, 8, generator=generator).bfloat16()
    losses = []
    for _ in range(8):
        loss = (transformer(**inputs).sample.float() - target.float()).pow(2).mean()
        loss.backward()
        assert all(p.grad is None for p in transformer.parameters())  # gradients reach the adapter only
        assert all(p.grad is not None for p in network.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("precision", ["fp8-torchao", "nf4-bnb"])
def test_gpu_only_precisions_name_what_this_machine_lacks(precision, monkeypatch):
    from job.model.transformer import precision_problem

    # A machine without a GPU (this test also runs where one is present).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = precision_problem(precision)
    assert problem is not None and precision in problem
    assert "int8-quanto" in problem  # what to use here instead
    assert precision_problem("int8-torchao") is None


def test_fp8_quanto_is_refused_with_simpletuners_reason():
    with pytest.raises(ValueError, match="AuraFlow does not support fp8-quanto; use fp8-torchao"):
        _job(base_model_precision="fp8-quanto")
