"""Group offload in training, on the CPU as both onload and offload device.

LoKr trains through the offloaded tiny AuraFlow exactly as without offload (bit for bit: the same math on
the same bytes) for every combination of precision, gradient checkpointing, grouping and storage; and the
offloader keeps its promises about what lives where.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from lokr_fixtures import SEED_LYCORIS
from torch.multiprocessing.reductions import StorageWeakRef

from job.config.schema import JobConfig
from job.model.lokr import attach_lokr, reset_lycoris_preset
from job.model.offload.apply import apply_group_offload
from job.model.offload.hooks import GroupOffload
from job.model.offload.settings import OffloadSettings
from job.model.offload.tensors import OffloadedTensor
from job.model.tiny import build_transformer
from job.model.transformer import prepare_base_model

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread")

CPU = torch.device("cpu")
STEPS = 3


def job_config(**overrides: object) -> JobConfig:
    settings: dict[str, object] = {
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris_config.json",
        "max_train_steps": STEPS,
    }
    settings.update(overrides)
    return JobConfig.model_validate(settings)


def tiny_model(
    precision: str = "no_change", checkpointing: bool = False, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny AuraFlow prepared as training prepares it, with the seed's LoKr attached."""
    torch.manual_seed(seed)
    job = job_config(base_model_precision=precision, gradient_checkpointing=checkpointing)
    transformer = prepare_base_model(build_transformer(), job, CPU)
    network = attach_lokr(transformer, SEED_LYCORIS, seed=1)
    network.requires_grad_(True)
    reset_lycoris_preset()
    return transformer, network


def inputs(dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator).to(dtype),
        "timestep": torch.rand(1, generator=generator),
    }


def train(
    transformer: torch.nn.Module, network: torch.nn.Module, autocast: bool = False
) -> list[torch.Tensor]:
    """STEPS AdamW steps; returns each step's LoKr gradients, then the LoKr weights."""
    dtype = next(transformer.parameters()).dtype
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    seen = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            prediction = transformer(**inputs(dtype, generator)).sample
        prediction.float().pow(2).mean().backward()
        seen.append(torch.cat([p.grad.flatten() for p in network.parameters()]))
        optimizer.step()
    seen.append(torch.cat([p.detach().flatten() for p in network.parameters()]))
    return seen


_references: dict[tuple[str, bool, bool], list[torch.Tensor]] = {}


def reference(precision: str, checkpointing: bool, autocast: bool = False) -> list[torch.Tensor]:
    key = (precision, checkpointing, autocast)
    if key not in _references:
        _references[key] = train(*tiny_model(precision, checkpointing), autocast=autocast)
    return _references[key]


def assert_identical(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.any(b != 0), f"step {step}: nothing to compare"
        assert torch.equal(a, b), f"step {step}: max difference {(a - b).abs().max().item()}"


LAYOUTS = [
    pytest.param("block_level", 1, False, False, id="block-ram"),
    pytest.param("block_level", 1, True, False, id="block-disk"),
    pytest.param("leaf_level", 1, True, False, id="leaf-disk"),
    pytest.param("block_level", 2, True, True, id="block2-disk-prefetch"),
    pytest.param("leaf_level", 1, False, True, id="leaf-ram-prefetch"),
]
# bf16 weights take the same (plain tensor) path as float32 ones: one layout is enough for them.
CASES = [
    pytest.param(precision, *layout.values, id=f"{precision}-{layout.id}")
    for precision in ("no_change", "int8-quanto")
    for layout in LAYOUTS
] + [pytest.param("bf16", *LAYOUTS[1].values, id="bf16-block-disk")]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("precision, offload_type, blocks_per_group, disk, prefetch", CASES)
def test_lokr_trains_identically_through_group_offload(
    tmp_path, precision, checkpointing, offload_type, blocks_per_group, disk, prefetch
):
    transformer, network = tiny_model(precision, checkpointing)
    settings = OffloadSettings(offload_type, blocks_per_group, False, tmp_path if disk else None)
    offload = GroupOffload(transformer, CPU, settings, prefetch=prefetch)
    try:
        assert_identical(train(transformer, network), reference(precision, checkpointing))
    finally:
        offload.close()
    # Every group went in and out once a step in forward and at most once in backward, and is out now.
    # (At leaf level some leaves have nothing to do in backward: the norms' modulation of temb.)
    stats = offload.stats
    assert stats.onloads == stats.offloads
    assert STEPS * len(offload.groups) < stats.onloads <= 2 * STEPS * len(offload.groups)
    if offload_type == "block_level":
        assert stats.onloads == 2 * STEPS * len(offload.groups)
        if not prefetch:
            assert stats.peak_resident_groups == 1
    assert all(isinstance(slot.current(), OffloadedTensor) for g in offload.groups for slot in g.slots)
    if prefetch:
        assert offload.stats.prefetched > 0


def test_autocast_over_float32_weights(tmp_path):
    transformer, network = tiny_model("no_change")
    GroupOffload(transformer, CPU, OffloadSettings("block_level", 1, False, tmp_path))
    assert_identical(train(transformer, network, autocast=True), reference("no_change", False, autocast=True))


def test_int4_quanto_weights_rebuild_from_their_packed_leaves(tmp_path):
    expected = train(*tiny_model("int4-quanto"))
    transformer, network = tiny_model("int4-quanto")
    GroupOffload(transformer, CPU, OffloadSettings("block_level", 1, False, tmp_path))
    assert_identical(train(transformer, network), expected)


def test_apply_group_offload_reads_the_job_config(tmp_path):
    transformer, network = tiny_model("int8-quanto", checkpointing=True)
    job = job_config(
        base_model_precision="int8-quanto",
        gradient_checkpointing=True,
        enable_group_offload=True,
        group_offload_type="leaf_level",
        group_offload_use_stream=True,  # silently off: the onload device is not CUDA
        group_offload_to_disk_path=str(tmp_path / "spill"),
    )
    offload = apply_group_offload(transformer, job, tmp_path / "offload", CPU)
    assert offload is not None and offload.settings.offload_type == "leaf_level"
    assert offload.settings.use_stream is False and offload.settings.disk_dir == tmp_path / "spill"
    assert_identical(train(transformer, network), reference("int8-quanto", True))


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_autograd_keeps_no_onloaded_weight_between_forward_and_backward(tmp_path, precision):
    # Without checkpointing autograd saves the weights (views of plain ones, quanto's tensor itself): they
    # must not pin the onloaded copies until backward, or the whole model piles up on the GPU.
    transformer, network = tiny_model(precision)
    offload = GroupOffload(transformer, CPU, OffloadSettings("block_level", 1, False, tmp_path))
    onloaded: list[StorageWeakRef] = []
    load = offload._load

    def recording_load(group, side_stream):
        leaves, event = load(group, side_stream)
        onloaded.extend(StorageWeakRef(leaf.untyped_storage()) for leaf in leaves.values())
        return leaves, event

    offload._load = recording_load
    prediction = transformer(**inputs(next(transformer.parameters()).dtype, torch.Generator())).sample
    gc.collect()
    assert onloaded and not [ref for ref in onloaded if not ref.expired()]
    prediction.float().mean().backward()  # and backward still finds them
    assert all(p.grad is not None for p in network.parameters())


def test_lokr_parameters_are_never_offloaded():
    transformer, network = tiny_model("int8-quanto")
    before = {name: p for name, p in network.named_parameters()}
    offload = GroupOffload(transformer, CPU, OffloadSettings("leaf_level", 1, False, None))
    moved = {id(slot.current()) for g in offload.groups for slot in g.slots}
    train(transformer, network)
    after = dict(network.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not moved & {id(p) for p in before.values()}
    assert all(p.device == CPU and not isinstance(p, OffloadedTensor) for p in after.values())


def test_an_offloaded_weight_used_outside_its_group_is_an_error_naming_it():
    transformer, _ = tiny_model("int8-quanto")
    GroupOffload(transformer, CPU, OffloadSettings("block_level", 1, False, None))
    to_q = transformer.single_transformer_blocks[0].attn.to_q
    with pytest.raises(RuntimeError, match=r"single_transformer_blocks\.0\.attn\.to_q\.weight is offloaded"):
        torch.nn.functional.linear(torch.randn(2, 64), to_q.weight)


def test_inference_through_offload_matches(tmp_path):
    transformer, _ = tiny_model("bf16")
    generator = torch.Generator().manual_seed(5)
    batch = inputs(torch.bfloat16, generator)
    with torch.no_grad():
        expected = transformer(**batch).sample
    GroupOffload(transformer, CPU, OffloadSettings("leaf_level", 1, False, Path(tmp_path)))
    with torch.no_grad():
        assert torch.equal(transformer(**batch).sample, expected)
