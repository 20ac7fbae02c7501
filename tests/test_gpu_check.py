"""scripts/gpu_check off the GPU: its FLOP count (read off a meta-device AuraFlow) agrees with the formula
worked out by hand from DESIGN §4's config; rows it cannot measure say why; the supervisor reports a row
that runs out of time or kills its worker and goes on; and the CPU dry run of the whole script (the same
code on the tiny model) prints a table with every row and writes JSON that parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch

from job.config.schema import JobConfig
from job.model.architecture import AURAFLOW_TRANSFORMER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from gpu_check import report
from gpu_check.cli import supported_precisions
from gpu_check.flops import count_flops, linear_tokens, step_shape
from gpu_check.rows import DRY_RUN, ROWS, skip_reason
from gpu_check.supervise import Supervisor

ROOT = Path(__file__).resolve().parent.parent


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
    shape = step_shape(AURAFLOW_TRANSFORMER, resolution, caption_tokens)
    count = count_flops(AURAFLOW_TRANSFORMER, shape)
    assert count.step == pytest.approx(hand_count(caption_tokens, resolution), rel=1e-12)


def test_one_step_at_1024_is_about_135_teraflop():
    shape = step_shape(AURAFLOW_TRANSFORMER, 1024, 120)
    assert (shape.image_tokens, shape.text_tokens) == (4096, 128)
    count = count_flops(AURAFLOW_TRANSFORMER, shape)
    assert count.step / 1e12 == pytest.approx(134.9, abs=0.1)
    without_checkpointing = count_flops(AURAFLOW_TRANSFORMER, shape, checkpointing=False)
    assert without_checkpointing.step == pytest.approx(
        count.step - count.linear_forward - count.attention_forward, rel=0.01
    )


def test_every_linear_layer_has_a_token_count():
    from diffusers import AuraFlowTransformer2DModel

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(**AURAFLOW_TRANSFORMER)
    shape = step_shape(AURAFLOW_TRANSFORMER, 1024, 120)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {linear_tokens(name, shape) for name in linears} == {1, 120, 128, 4096, 4224}
    with pytest.raises(ValueError, match="does not know"):
        linear_tokens("some_new_layer", shape)


def test_a_row_counts_once_lokr_job_accepts_its_precision():
    accepted = typing.get_args(JobConfig.model_fields["base_model_precision"].annotation)
    assert supported_precisions() == accepted
    for row in ROWS:
        reason = skip_reason(row, accepted, cuda=True)
        # nf4-bnb is applied while loading a model folder, which the rows' in-memory weights never are.
        assert (reason is None) == (row.precision in accepted and row.precision != "nf4-bnb"), row.key
    torchao = next(r for r in ROWS if r.key == "int8-torchao")
    assert skip_reason(torchao, (*accepted, "int8-torchao"), cuda=True) is None
    assert "not available yet" in skip_reason(torchao, ("bf16",), cuda=True)
    streams = next(r for r in ROWS if r.key == "int8-ram")
    assert skip_reason(streams, accepted, cuda=False) == "needs CUDA (streams, pinned memory)"


# A stand-in worker: no torch, just the event protocol. "hang" stops answering after one measured step,
# "die" exits with a message, the others finish.
_FAKE_WORKER = textwrap.dedent(
    """
    import json, sys, time
    task = json.loads(sys.argv[1])
    def emit(event, **fields):
        print("@gpu_check " + json.dumps({"event": event, **fields}), flush=True)
    if task["probe"]:
        emit("probe", device="fake", bf16_matmul_flops=1e12)
    for key in task["rows"]:
        print("a library's own output", flush=True)
        emit("step", key=key, index=0, seconds=0.5, warmup=True)
        emit("step", key=key, index=1, seconds=0.25, warmup=False)
        if key == "hang":
            time.sleep(60)
        if key == "die":
            print("boom: the GPU fell off the bus", file=sys.stderr, flush=True)
            sys.exit(3)
        emit("row", key=key, status="ok", step_s=0.25)
    """
)


def test_a_row_that_hangs_or_kills_its_worker_is_reported_and_the_rest_go_on(tmp_path):
    lines: list[str] = []
    supervisor = Supervisor(
        lambda task: [sys.executable, "-c", _FAKE_WORKER, json.dumps(task)],
        dict(os.environ),
        tmp_path,
        budget=lambda key: 0 if key == "late" else 3.0,
        log=lines.append,
    )
    supervisor.run(["first", "hang", "die", "last", "late"], {})
    results = supervisor.results
    assert supervisor.probe is not None and supervisor.probe["device"] == "fake"
    assert results["first"]["status"] == results["last"]["status"] == "ok"
    assert results["hang"]["status"] == "timeout"
    assert "ran out of its 3 s budget after 1 measured and 1 warm-up steps" in results["hang"]["reason"]
    assert results["hang"]["step_s"] == 0.25  # what it measured before its time ran out
    assert results["die"]["status"] == "crashed"
    assert results["die"]["reason"] == "the worker died (exit code 3): boom: the GPU fell off the bus"
    assert results["late"] == {
        "key": "late",
        "status": "not run",
        "reason": "the check's time ran out",
        "step_times": [],
        "step_s": None,
        "row_s": pytest.approx(0, abs=1),
    }
    assert any("hang: timeout" in line for line in lines)


@pytest.mark.slow
def test_the_dry_run_prints_every_row_with_figures_or_a_reason(tmp_path):
    # The script as CI and a GPU session run it, on the CPU: worker processes, the tiny model, the tiny
    # job killed and resumed through the real CLI.
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=DRY_RUN.deadline_s + 60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((tmp_path / report.JSON).read_text())
    table = (tmp_path / report.MARKDOWN).read_text()
    assert table in done.stdout
    assert [row["key"] for row in data["rows"]] == [r.key for r in ROWS]
    for row in data["rows"]:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row['label']} |"))
        if row["status"] == "ok":
            assert row["step_s"] > 0 and len(row["step_times"]) == DRY_RUN.steps, row
            assert row["floor_ratio"] > 0 and row["estimate_gib"] > 0, row
            assert f"| ok | {row['step_s']:.3f} ({DRY_RUN.steps}) |" in line
        else:
            assert row["status"] == "skipped", row
            assert row["reason"].startswith(("needs CUDA", "not available yet", "not measured here")), row
            assert f"| skipped: {row['reason']} |" in line
    assert {row["key"] for row in data["rows"] if row["status"] == "ok"} >= {"bf16", "int8-disk"}
    tiny = data["tiny_job"]
    assert tiny["status"] == "ok" and tiny["identical"] is True, tiny
    assert [run["exit"] for run in tiny["runs"] if run["run"] == "B stopped"] == [75]
    assert "same adapter bytes" in table
