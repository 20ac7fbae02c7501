"""A full-rank fine-tune (``model_type: full``) published: ``transformer/`` and a model card that loads it
(no LyCORIS anywhere) to the Hub in one commit, and a missing transformer refused before any upload."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_cards import card_render_settings, front_matter, python_block, run_python_block
from PIL import Image
from remote_trees import tree_files

from job import stages
from job.cli import main
from job.config.loader import ResolvedConfig, load_config
from job.context import JobContext, open_context
from job.errors import ExitCode
from job.infer import infer
from job.model.tiny import build_transformer
from job.publish.card import model_card

REPO = "someone/tiny-full"
IMAGES = ("validation", "photo", "drawing")  # validation_prompt and the tiny prompt library's nicknames


@pytest.fixture(scope="module")
def full_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The tiny job switched to full-rank training (which requires a DeepSpeed config)."""
    deepspeed = tmp_path_factory.mktemp("deepspeed") / "ds_config.json"
    deepspeed.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return ["model_type=full", f"deepspeed_config={deepspeed}"]


@pytest.fixture(scope="module")
def cfg(tiny_job: Path, full_overrides: list[str]) -> ResolvedConfig:
    return load_config(tiny_job, [*full_overrides, f"hub_model_id={REPO}"])


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_full_output(output: Path, *, max_shard_size: str | None = None) -> None:
    """``output/`` as full-rank training leaves it: a tiny transformer with weights of its own (not the base
    model's), saved by diffusers, the result record and two validation steps' images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        transformer = build_transformer()
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    transformer.save_pretrained(output / "transformer", safe_serialization=True, **shards)
    result = {"model_type": "full", "step": 24, "config_hash": "x", "files": {}}
    (output / "training_result.json").write_text(json.dumps(result))
    for step, colour in ((16, "gray"), (24, "white")):
        folder = output / "validation" / f"step-{step}"
        folder.mkdir(parents=True)
        for name in IMAGES:
            (folder / f"{name}.png").write_bytes(_png(colour))


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("trained") / "output"
    write_full_output(output)
    return output


def test_the_card_describes_a_full_fine_tune_without_lycoris(cfg: ResolvedConfig) -> None:
    images = [("photo", "a photo", "validation/step-24/photo.png")]
    card = model_card(cfg, base_model="terminusresearch/auraflow-v0.3", validation_images=images, step=24)
    meta = front_matter(card)
    assert meta["base_model"] == "terminusresearch/auraflow-v0.3" and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["auraflow", "text-to-image", "diffusers", "full-finetune"]
    assert "# tiny-full\n\nA full fine-tune of the AuraFlow transformer" in card
    assert "trained for 24 steps" in card and "| Steps | 24 (24 planned) |" in card
    assert "![photo](validation/step-24/photo.png)" in card
    # The tiny config still names a lycoris_config; a full-rank card must not describe an adapter.
    assert not re.search(r"lycoris|lokr adapter|```json", card, re.IGNORECASE)


def test_the_python_block_loads_the_transformer_from_local_files(
    cfg: ResolvedConfig, trained_output: Path, tmp_path: Path
) -> None:
    card = model_card(cfg, base_model="terminusresearch/auraflow-v0.3", validation_images=[], step=24)
    assert f"MODEL_REPO = {REPO!r}\n" in python_block(card)
    model = Path(cfg.job.model_source)
    constants = {"BASE_MODEL": str(model), "MODEL_REPO": str(trained_output)}
    produced = run_python_block(card, constants, tmp_path / "run")

    # The same image as lokr-job infer gives with the trained transformer, and not the base model's.
    settings = card_render_settings(cfg)
    prompts = [cfg.job.validation_prompt]
    (expected,) = infer(model, None, prompts, tmp_path / "infer", transformer=trained_output, **settings)
    (base,) = infer(model, None, prompts, tmp_path / "base", **settings)
    assert produced.shape == (64, 64, 3)
    assert np.array_equal(produced, np.asarray(Image.open(expected)))
    assert not np.array_equal(produced, np.asarray(Image.open(base)))


def _context(tiny_job: Path, work: Path, output: Path | None, overrides: list[str]) -> JobContext:
    ctx = open_context(str(tiny_job), work, None, overrides)
    if output is not None:
        shutil.copytree(output, ctx.workdir.output)
    return ctx


@pytest.mark.parametrize("max_shard_size", [None, "1MB"], ids=["one-file", "sharded"])
def test_publish_pushes_the_transformer_and_card_in_one_commit(
    hub,
    tiny_job: Path,
    full_overrides: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    max_shard_size: str | None,
) -> None:
    output = tmp_path / "trained"
    write_full_output(output, max_shard_size=max_shard_size)
    push = [*full_overrides, "push_to_hub=true", f"hub_model_id={REPO}"]
    with caplog.at_level(logging.INFO, logger="lokr"):
        stages.publish(_context(tiny_job, tmp_path / "work", output, push))

    commits = hub.log.select(lambda e: e.method == "POST" and "/commit/" in e.path and e.status == 200)
    assert len(commits) == 1
    files = hub.files(REPO)
    local = tree_files(output)
    weights = {path for path in local if path.startswith("transformer/")}
    assert "transformer/config.json" in weights
    if max_shard_size is None:
        assert "transformer/diffusion_pytorch_model.safetensors" in weights
    else:
        assert "transformer/diffusion_pytorch_model.safetensors.index.json" in weights
        assert len([p for p in weights if p.endswith(".safetensors")]) > 1
    published = weights | {f"validation/step-24/{name}.png" for name in IMAGES}
    # No LoKr files: no adapter, no lycoris_config.json (the tiny config names one), no EMA.
    assert set(files) - {".gitattributes"} == published | {"README.md"}
    assert all(files[path] == local[path] for path in published)
    card = files["README.md"].decode()
    assert "A full fine-tune of the AuraFlow transformer" in card and "trained for 24 steps" in card
    assert any(
        r.getMessage() == f"publish: full-rank transformer pushed to hf://{REPO}" for r in caplog.records
    )


@pytest.mark.parametrize("leftover", ["nothing", "config-only", "lokr-adapter"])
def test_a_full_output_without_its_transformer_is_a_config_error(
    hub,
    tiny_job: Path,
    full_overrides: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    leftover: str,
) -> None:
    work = tmp_path / "work"
    output = work / "output"
    output.mkdir(parents=True)
    if leftover == "config-only":  # a transformer folder whose weights never got written
        (output / "transformer").mkdir()
        (output / "transformer" / "config.json").write_text("{}")
    elif leftover == "lokr-adapter":  # what a model_type lora run leaves is not a full-rank model
        (output / "pytorch_lora_weights.safetensors").write_bytes(b"not this")
    argv = ["publish", "--config", str(tiny_job), "--workdir", str(work)]
    for item in (*full_overrides, "push_to_hub=true", f"hub_model_id={REPO}"):
        argv += ["--set", item]

    assert main(argv) == ExitCode.BAD_CONFIG
    err = capsys.readouterr().err
    assert f"nothing to publish: {output / 'transformer'} holds no trained transformer" in err
    assert "run lokr-job train first" in err
    assert hub.log.select() == []
