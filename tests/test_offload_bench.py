"""scripts/bench_gpu.py off the GPU: it answers --help, and its FLOP count (read off a meta-device AuraFlow)
agrees with the formula worked out by hand from DESIGN §4's config."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def hand_count(caption_tokens: int, resolution: int) -> float:
    """One LoKr step of AuraFlow v0.3 with checkpointing, layer by layer."""
    d, heads_dim, text_dim, patch, channels = 3072, 256, 2048, 2, 4
    hidden = 8192  # AuraFlowFeedForward: 2/3 of 4·d, rounded up to a multiple of 256
    image = (resolution // 8 // patch) ** 2
    text = caption_tokens + 8
    sequence = image + text
    attention_ff = 4 * d * d + 3 * d * hidden  # q, k, v, out; two up-projections and one down
    modulation = 6 * d * d  # AdaLayerNormZero's linear, on the timestep vector alone
    single = 2 * attention_ff * sequence + 2 * modulation
    joint = 2 * attention_ff * image + 2 * attention_ff * text + 2 * 2 * modulation
    blocks_forward = 32 * single + 4 * joint
    embedders = 2 * (
        patch * patch * channels * d * image + text_dim * d * caption_tokens + (256 * d + d * d) + 2 * d * d
    )
    head = 2 * d * patch * patch * channels * image
    attention = 36 * 4 * sequence**2 * (12 * heads_dim)
    # Blocks: forward, recompute, input gradient. Head: forward, input gradient. Embedders: forward.
    return 3 * blocks_forward + 2 * head + embedders + 4 * attention


@pytest.mark.parametrize("resolution, caption_tokens", [(1024, 120), (512, 768)])
def test_flop_count_matches_the_hand_formula(resolution, caption_tokens):
    shape = bench.step_shape(bench.AURAFLOW_TRANSFORMER, resolution, caption_tokens)
    count = bench.count_flops(bench.AURAFLOW_TRANSFORMER, shape)
    assert count.step == pytest.approx(hand_count(caption_tokens, resolution), rel=1e-12)


def test_one_step_at_1024_is_about_135_teraflop():
    shape = bench.step_shape(bench.AURAFLOW_TRANSFORMER, 1024, 120)
    assert (shape.image_tokens, shape.text_tokens) == (4096, 128)
    count = bench.count_flops(bench.AURAFLOW_TRANSFORMER, shape)
    assert count.step / 1e12 == pytest.approx(134.9, abs=0.1)
    without_checkpointing = bench.count_flops(bench.AURAFLOW_TRANSFORMER, shape, checkpointing=False)
    assert without_checkpointing.step == pytest.approx(
        count.step - count.linear_forward - count.attention_forward, rel=0.01
    )


def test_every_linear_layer_has_a_token_count():
    from diffusers import AuraFlowTransformer2DModel

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(**bench.AURAFLOW_TRANSFORMER)
    shape = bench.step_shape(bench.AURAFLOW_TRANSFORMER, 1024, 120)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {bench.linear_tokens(name, shape) for name in linears} == {1, 120, 128, 4096, 4224}
    with pytest.raises(ValueError, match="does not know"):
        bench.linear_tokens("some_new_layer", shape)


def test_only_selects_configurations():
    assert bench.selected(None) == [(p, o) for p in ("bf16", "int8-quanto") for o in ("none", "ram", "disk")]
    assert bench.selected("int8:disk,bf16:none") == [("int8-quanto", "disk"), ("bf16", "none")]
    with pytest.raises(SystemExit, match="precision:offload"):
        bench.selected("fp8:ram")


def test_the_script_answers_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--dry-run" in done.stdout and "FLOPs per step" in done.stdout


def test_dry_run_prints_the_flop_count(capsys):
    assert bench.main(["--dry-run"]) == 0
    assert "FLOPs per training step: 134.91 T" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_without_cuda_it_says_so(capsys):
    assert bench.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("precision, offload", [("int8-quanto", "disk"), ("bf16", "ram")])
def test_the_measuring_loop_runs_on_the_cpu_with_the_tiny_model(tmp_path, precision, offload):
    # The same code the GPU run takes (model built on the device, prepare_base_model, the seed's LoKr,
    # apply_group_offload with the seed's flags, training steps), at the tiny model's size.
    from job.model.lokr import reset_lycoris_preset
    from job.model.tiny import TRANSFORMER_CONFIG

    setup = bench.Setup(torch.device("cpu"), TRANSFORMER_CONFIG, 64, 6, 1, 2, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = bench.bench_config(precision, offload, setup, floor_s=0.01)
    finally:
        torch.set_num_threads(threads)
        reset_lycoris_preset()
    assert (row.precision, row.offload) == (precision, offload)
    assert row.step_s > 0 and row.ratio == row.step_s / 0.01
    onloads = int(row.prefetch.split("/")[1])
    assert onloads == 3 * 2 * 3  # three groups, twice a step, three steps
