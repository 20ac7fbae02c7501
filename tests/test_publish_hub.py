"""``lokr-job publish``: the adapter, card and latest validation images to the Hub in one commit, and the
output to the run URI; a push that keeps failing exits 75 and a rerun finishes the job."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from remote_trees import tree_files

from job import stages
from job.cli import main
from job.context import JobContext, open_context
from job.errors import ConfigError, ExitCode

REPO = "someone/tiny-lokr"
PUSH = ["push_to_hub=true", f"hub_model_id={REPO}"]
IMAGES = ("validation", "photo", "drawing")  # validation_prompt and the tiny prompt library's nicknames


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained_output(tiny_job: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``output/`` as training leaves it: a real LoKr file of the tiny transformer, its config, the EMA
    adapter, the result record and two validation steps' images."""
    from diffusers import AuraFlowTransformer2DModel

    from job.config.loader import load_config
    from job.model.lokr import attach_lokr, lycoris_settings, reset_lycoris_preset, save_adapter

    cfg = load_config(tiny_job)
    assert cfg.lycoris is not None
    output = tmp_path_factory.mktemp("trained") / "output"
    (output / "ema").mkdir(parents=True)
    transformer = AuraFlowTransformer2DModel.from_pretrained(cfg.job.model_source, subfolder="transformer")
    network = attach_lokr(transformer, cfg.lycoris, seed=7)
    save_adapter(network, output / "pytorch_lora_weights.safetensors", cfg.lycoris)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(0.5)
    save_adapter(network, output / "ema" / "ema_model.safetensors", cfg.lycoris)
    reset_lycoris_preset()
    (output / "lycoris_config.json").write_text(json.dumps(lycoris_settings(cfg.lycoris), indent=4))
    (output / "training_result.json").write_text(json.dumps({"step": 24, "config_hash": cfg.hash}))
    for step, colour in ((16, "gray"), (24, "white")):
        folder = output / "validation" / f"step-{step}"
        folder.mkdir(parents=True)
        for name in IMAGES:
            (folder / f"{name}.png").write_bytes(_png(colour))
    return output


def _context(
    tiny_job: Path, work: Path, output: Path | None, *, run_uri: str | None = None, overrides=PUSH
) -> JobContext:
    ctx = open_context(str(tiny_job), work, run_uri, list(overrides))
    if output is not None:
        shutil.copytree(output, ctx.workdir.output)
    return ctx


def _commits(hub) -> list:
    return hub.log.select(lambda e: e.method == "POST" and "/commit/" in e.path and e.status == 200)


def test_publish_is_one_commit_of_adapter_card_ema_and_latest_images(
    hub, tiny_job: Path, trained_output: Path, tmp_path: Path
) -> None:
    stages.publish(_context(tiny_job, tmp_path / "work", trained_output))

    assert len(_commits(hub)) == 1
    files = hub.files(REPO)
    expected = {
        "pytorch_lora_weights.safetensors",
        "lycoris_config.json",
        "README.md",
        "ema/ema_model.safetensors",
        *(f"validation/step-24/{name}.png" for name in IMAGES),
    }
    assert set(files) - {".gitattributes"} == expected  # step 16's images are not published
    local = tree_files(trained_output)
    assert all(files[path] == local[path] for path in expected - {"README.md"})
    assert hub.repos[("model", REPO)].private is True

    card = files["README.md"].decode()
    assert "base_model: terminusresearch/auraflow-v0.3" in card
    assert "trained for 24 steps" in card
    for name in IMAGES:
        assert f"validation/step-24/{name}.png" in card
    assert not re.search(r"step-16", card)


def test_publish_formats_push_the_comfyui_file_and_the_merged_transformer_beside_the_adapter(
    hub, tiny_job: Path, trained_output: Path, tmp_path: Path
) -> None:
    from diffusers import AuraFlowTransformer2DModel
    from safetensors.torch import load_file

    overrides = [*PUSH, 'publish_formats=["comfyui", "merged"]']
    stages.publish(_context(tiny_job, tmp_path / "work", trained_output, overrides=overrides))
    assert len(_commits(hub)) == 1
    files = hub.files(REPO)
    assert {"comfyui/lokr-comfyui.safetensors", "comfyui/export.json", "merged/export.json"} <= set(files)
    assert "merged/transformer/config.json" in files
    repo = tmp_path / "repo"
    for path, data in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(data)
    adapter = load_file(trained_output / "pytorch_lora_weights.safetensors")
    comfyui = load_file(repo / "comfyui" / "lokr-comfyui.safetensors")
    assert len(comfyui) == len(adapter) and all(key.startswith("transformer.") for key in comfyui)
    AuraFlowTransformer2DModel.from_pretrained(repo / "merged" / "transformer")  # diffusers loads it
    weights = load_file(repo / "merged" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def test_hub_private_false_makes_a_public_repo(
    hub, tiny_job: Path, trained_output: Path, tmp_path: Path
) -> None:
    stages.publish(
        _context(tiny_job, tmp_path / "work", trained_output, overrides=[*PUSH, "hub_private=false"])
    )
    assert hub.repos[("model", REPO)].private is False


def test_thirty_percent_faults_still_push_the_same_bytes(
    hub, tiny_job: Path, trained_output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "12")
    hub.faults.configure(rate=0.3, seed=7)
    stages.publish(_context(tiny_job, tmp_path / "work", trained_output))
    assert len(hub.log.faults()) >= 3
    files, local = hub.files(REPO), tree_files(trained_output)
    assert files["pytorch_lora_weights.safetensors"] == local["pytorch_lora_weights.safetensors"]
    assert files["ema/ema_model.safetensors"] == local["ema/ema_model.safetensors"]


def test_a_push_that_keeps_failing_exits_75_and_a_rerun_finishes(
    s3, hub, tiny_job: Path, trained_output: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    _context(tiny_job, work, trained_output)
    argv = ["publish", "--config", str(tiny_job), "--workdir", str(work), "--run-uri", s3.uri("runs/one")]
    argv += [arg for item in PUSH for arg in ("--set", item)]
    hub.faults.configure(rate=1.0, kinds=["503"], methods=["POST"], path="/commit/")

    assert main(argv) == ExitCode.TRANSIENT
    assert "run lokr-job publish again" in capsys.readouterr().err
    adapter = (trained_output / "pytorch_lora_weights.safetensors").read_bytes()
    assert s3.get("runs/one/output/pytorch_lora_weights.safetensors") == adapter  # safe before the push
    assert (work / "output" / "pytorch_lora_weights.safetensors").read_bytes() == adapter

    hub.faults.off()
    assert main(argv) == ExitCode.OK
    assert hub.files(REPO)["pytorch_lora_weights.safetensors"] == adapter


def test_run_uri_alone_gets_the_whole_output(
    s3, tiny_job: Path, trained_output: Path, tmp_path: Path
) -> None:
    ctx = _context(tiny_job, tmp_path / "work", trained_output, run_uri=s3.uri("runs/two"), overrides=[])
    stages.publish(ctx)
    uploaded = {k.removeprefix("runs/two/output/"): s3.get(k) for k in s3.keys("runs/two/output/")}
    assert uploaded == tree_files(trained_output)


def test_nothing_trained_is_a_config_error(hub, tiny_job: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothing to publish.*run lokr-job train first") as caught:
        stages.publish(_context(tiny_job, tmp_path / "work", None))
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert hub.log.select() == []


def test_nothing_to_publish_without_push_or_run_uri(tiny_job: Path, tmp_path: Path) -> None:
    stages.publish(_context(tiny_job, tmp_path / "work", None, overrides=[]))  # no adapter, no error
