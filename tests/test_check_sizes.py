"""Sizes against the transformer's positional grid, refused before any GPU time (``check``, ``run``,
``infer``), and SimpleTuner's 64 px aspect-bucket alignment for AuraFlow."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from job.check import build_report
from job.cli import main
from job.config.backends import DatasetConfig
from job.config.loader import load_config
from job.config.schema import JobConfig
from job.context import open_context
from job.data.transform import plan_transform
from job.errors import ConfigError, ExitCode
from job.infer import infer
from job.model.components import flavour_geometry, job_geometry
from job.tiny import IMAGE_SIZES


def _problems(tiny_job: Path, workdir: Path, *overrides: str) -> tuple[int, str]:
    report = build_report(open_context(str(tiny_job), workdir, None, list(overrides)))
    return report.exit_code, "\n".join(message for _, message in report.problems)


def test_aspect_buckets_align_to_simpletuners_64_px_for_auraflow(tiny_job: Path) -> None:
    """SimpleTuner's field registry defaults aspect_bucket_alignment to 64
    (simpletuner/simpletuner_sdk/server/services/field_registry/sections/advanced.py) and its AuraFlow model
    forces 64 whatever is set (simpletuner/helpers/models/auraflow/model.py, Auraflow.check_user_config)."""
    job = JobConfig(data_backend_config="d.json", max_train_steps=1, lycoris_config="l.json")
    assert job.aspect_bucket_alignment == 64
    geometry = job_geometry(job, None)
    dataset = DatasetConfig(id="d", instance_data_dir="x", resolution=1024, resolution_type="pixel_area")
    wide = plan_transform(1600, 900, dataset, geometry, seed=0, image_sha256="0" * 64, aspect_rounding=None)
    assert all(side % 64 == 0 for side in wide.bucket) and wide.bucket == (1344, 768)

    # The tiny job's 64-96 px images all fit one 64x64 bucket at 64 px: every image still trains.
    small = DatasetConfig(id="t", instance_data_dir="x", resolution=64, resolution_type="pixel_area")
    buckets = {
        plan_transform(w, h, small, geometry, seed=0, image_sha256="0" * 64, aspect_rounding=None).bucket
        for w, h in IMAGE_SIZES
    }
    assert buckets == {(64, 64)}
    # The tiny job asks for 16 px to keep its aspect buckets, and gets them.
    tiny = job_geometry(load_config(tiny_job).job, None)
    assert plan_transform(
        80, 64, small, tiny, seed=0, image_sha256="0" * 64, aspect_rounding=None
    ).bucket == (
        80,
        64,
    )


def test_check_refuses_validation_sizes_past_the_grid_naming_the_largest_that_fits(
    tiny_job: Path, tmp_path: Path
) -> None:
    code, text = _problems(tiny_job, tmp_path / "w", "validation_resolution=2048x2048,1600x640,64x64,1000x64")
    assert code == ExitCode.BAD_CONFIG
    assert "validation_resolution 2048x2048" in text and "largest size that fits is 1536x1536" in text
    # Wider than the grid, though fewer patches than it holds: refused, not rendered with reused positions.
    assert "validation_resolution 1600x640" in text and "at this aspect 1536x608" in text
    assert "validation_resolution 1000x64: sides must be multiples of 16 px" in text and "1008x64" in text
    assert "64x64" not in text.replace("1000x64", "")
    assert str(tiny_job) in text  # the file the key is in


def test_check_refuses_an_alignment_off_the_patch_grid(tiny_job: Path, tmp_path: Path) -> None:
    code, text = _problems(tiny_job, tmp_path / "w", "aspect_bucket_alignment=24")
    assert code == ExitCode.BAD_CONFIG
    assert "aspect_bucket_alignment 24" in text and "multiple of 16" in text


def test_check_reads_the_grid_of_the_model_it_will_train(tiny_job: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_job.parent.parent / "model", model)
    config = model / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pos_embed_max_size": 1024}))
    code, text = _problems(
        tiny_job, tmp_path / "w", f"pretrained_model_name_or_path={model}", "validation_resolution=640x64"
    )
    assert code == ExitCode.BAD_CONFIG
    assert "32x32 (pos_embed_max_size 1024" in text and "largest size that fits is 512x512" in text


def test_run_refuses_sizes_before_anything_is_fetched(
    tiny_job: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A v0.2 model is not fetched: its known 64x64-patch grid refuses v0.3's 1536 px sizes."""
    backends = json.loads((tiny_job.parent / "multidatabackend.json").read_text())
    backends[0].update(
        instance_data_dir=str(tiny_job.parent.parent / "datasets" / "tiny-subject"), resolution=1536
    )
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    workdir = tmp_path / "w"
    overrides = [
        "pretrained_model_name_or_path=fal/AuraFlow-v0.2",
        "validation_resolution=1536x1536",
        f"data_backend_config={tmp_path / 'backends.json'}",
    ]
    with caplog.at_level(logging.ERROR, logger="lokr"):
        code = main(
            ["run", "--config", str(tiny_job), "--workdir", str(workdir)]
            + [arg for item in overrides for arg in ("--set", item)]
        )
    assert code == ExitCode.BAD_CONFIG
    assert "validation_resolution 1536x1536" in caplog.text
    assert "largest size that fits is 1024x1024\n" in caplog.text  # square: no second suggestion
    assert (
        "'tiny-subject': resolution 1536" in caplog.text and "set resolution to 1024 or less" in caplog.text
    )
    for stage_output in ("models", "data", "cache", "checkpoints", "output"):
        folder = workdir / stage_output
        assert not folder.exists() or not any(folder.iterdir()), stage_output


def test_known_grids_of_the_flavours() -> None:
    assert flavour_geometry("v0.3").max_side == flavour_geometry("pony").max_side == 1536
    assert flavour_geometry("v0.1").max_side == flavour_geometry("v0.2").max_side == 1024


def test_infer_refuses_a_size_past_the_grid_before_loading_the_model(tmp_path: Path, tiny_job: Path) -> None:
    # Configs only, no weights: a size refused here was refused before any loading.
    model = tmp_path / "configs-only"
    source = tiny_job.parent.parent / "model"
    for name in ("model_index.json", "vae/config.json", "transformer/config.json"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, model / name)
    with pytest.raises(
        ConfigError, match=r"--width/--height 2048x1024: .* largest size that fits is 1536x1536"
    ):
        infer(model, None, ["a red circle"], tmp_path / "out", width=2048, height=1024)
    with pytest.raises(ConfigError, match="multiples of 16 px"):
        infer(model, None, ["a red circle"], tmp_path / "out", width=100, height=64)
    cli = [
        "infer",
        "--base-model",
        str(model),
        "--adapter",
        str(tmp_path / "none.safetensors"),
        "--prompt",
        "x",
    ]
    assert main([*cli, "--width", "1552", "--height", "64"]) == ExitCode.BAD_CONFIG
    assert not (tmp_path / "out").exists()


def test_validation_renders_at_the_widest_size_the_grid_allows(tiny_job: Path, tmp_path: Path) -> None:
    from diffusers import AuraFlowTransformer2DModel

    from job.validate.render import build_validation_pipeline, render_validation

    cfg = load_config(tiny_job, ["validation_resolution=1536x64"])
    _, text = _problems(tiny_job, tmp_path / "w", "validation_resolution=1536x64")
    assert "validation_resolution" not in text, text
    transformer = AuraFlowTransformer2DModel.from_pretrained(cfg.job.model_source, subfolder="transformer")
    pipeline = build_validation_pipeline(cfg.job.model_source, transformer, torch.float32, "cpu")
    (path,) = render_validation(pipeline, {"wide": "a red circle"}, cfg.job, 1, tmp_path / "out")
    assert Image.open(path).size == (1536, 64)
