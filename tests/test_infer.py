"""``lokr-job infer`` on the tiny model: the adapter changes images, seeds repeat, int8 merges first; a
full-rank fine-tune's transformer replaces the base model's, and LoKr-only options are refused with it."""

import argparse
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lokr_fixtures import write_random_adapter
from PIL import Image

from job.config.loader import load_config
from job.context import JobContext
from job.errors import ConfigError
from job.infer import add_infer_arguments, infer, run_infer
from job.model.tiny import build_transformer
from job.workdir import WorkDir

PROMPT = "a red circle on blue"
FAST = {"steps": 2, "width": 64, "height": 64, "seed": 3, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def model(tiny_job: Path) -> Path:
    return tiny_job.parent.parent / "model"


@pytest.fixture(scope="module")
def adapter(tiny_job: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_adapter(
        model,
        load_config(tiny_job).lycoris,
        tmp_path_factory.mktemp("adapter") / "pytorch_lora_weights.safetensors",
    )


@pytest.fixture(scope="module")
def full_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``output/`` of a full-rank run: a tiny transformer with weights of its own, as diffusers saves it."""
    output = tmp_path_factory.mktemp("full") / "output"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        build_transformer().save_pretrained(output / "transformer", safe_serialization=True)
    return output


@pytest.fixture(scope="module")
def full_config(tiny_job: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides that make the tiny job full-rank (which requires a DeepSpeed config)."""
    deepspeed = tmp_path_factory.mktemp("deepspeed") / "ds_config.json"
    deepspeed.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return ["model_type=full", f"deepspeed_config={deepspeed}"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_adapter_changes_the_image_and_a_seed_repeats_it(model: Path, adapter: Path, tmp_path: Path) -> None:
    (first,) = infer(model, adapter, [PROMPT], tmp_path / "a", **FAST)
    (again,) = infer(model, adapter, [PROMPT], tmp_path / "b", **FAST)
    (base,) = infer(model, None, [PROMPT], tmp_path / "base", **FAST)
    (off,) = infer(model, adapter, [PROMPT], tmp_path / "off", scale=0.0, **FAST)
    (other_seed,) = infer(model, adapter, [PROMPT], tmp_path / "seed", **{**FAST, "seed": 4})
    assert first.name == "00-a_red_circle_on_blue.png"
    assert first.read_bytes() == again.read_bytes()
    assert np.abs(_pixels(first) - _pixels(base)).mean() > 0.1
    # The scale reaches the merge (merge_to ignores create_lycoris_from_weights' multiplier).
    assert np.array_equal(_pixels(off), _pixels(base))
    assert first.read_bytes() != other_seed.read_bytes()


def test_int8_quantizes_after_merging(model: Path, adapter: Path, tmp_path: Path) -> None:
    (full,) = infer(model, adapter, [PROMPT], tmp_path / "full", **FAST)
    (int8,) = infer(model, adapter, [PROMPT], tmp_path / "int8", int8=True, **FAST)
    (base,) = infer(model, None, [PROMPT], tmp_path / "base", int8=True, **FAST)
    # Had the LoKr been applied to quantized layers it would do nothing: int8 would look like the base.
    assert np.abs(_pixels(int8) - _pixels(full)).mean() < np.abs(_pixels(int8) - _pixels(base)).mean()


def test_adapter_may_be_its_folder_and_prompts_may_be_named(
    model: Path, adapter: Path, tmp_path: Path
) -> None:
    paths = infer(model, adapter.parent, {"cat/photo": "a cat", "dog": "a dog"}, tmp_path, **FAST)
    assert [p.name for p in paths] == ["cat_photo.png", "dog.png"]


def test_missing_adapter_is_a_config_error(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        infer(model, tmp_path / "nothing.safetensors", [PROMPT], tmp_path, **FAST)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    return parser


def test_cli_options_parse() -> None:
    argv = shlex.split(
        "--adapter s3://b/run/output --prompt one --prompt two --int8 --scale 0.5 "
        "--negative-prompt blurry --base-model fal/AuraFlow-v0.2 --width 768"
    )
    args = _parser().parse_args(argv)
    assert (args.adapter, args.prompts, args.int8, args.scale) == (
        "s3://b/run/output",
        ["one", "two"],
        True,
        0.5,
    )
    assert (args.negative_prompt, args.base_model, args.width, args.height) == (
        "blurry",
        "fal/AuraFlow-v0.2",
        768,
        None,
    )


def test_run_infer_takes_the_rest_from_the_config(tiny_job: Path, adapter: Path, tmp_path: Path) -> None:
    workdir = WorkDir(tmp_path / "work")
    workdir.output.mkdir(parents=True)
    shutil.copy(adapter, workdir.output / adapter.name)
    ctx = JobContext(config=load_config(tiny_job), workdir=workdir)
    paths = run_infer(_parser().parse_args([]), ctx)
    assert [p.relative_to(workdir.output).as_posix() for p in paths] == [
        "infer/validation.png",
        "infer/photo.png",
        "infer/drawing.png",
    ]
    assert Image.open(paths[0]).size == (64, 64)


def test_run_infer_without_config_needs_a_base_model() -> None:
    with pytest.raises(ConfigError, match="--base-model"):
        run_infer(_parser().parse_args(["--adapter", "x", "--prompt", "p"]), None)


def test_a_full_rank_transformer_replaces_the_base_models(
    model: Path, full_output: Path, tmp_path: Path
) -> None:
    (trained,) = infer(model, None, [PROMPT], tmp_path / "full", transformer=full_output, **FAST)
    (folder,) = infer(
        model, None, [PROMPT], tmp_path / "folder", transformer=full_output / "transformer", **FAST
    )
    (base,) = infer(model, None, [PROMPT], tmp_path / "base", **FAST)
    assert Image.open(trained).size == (64, 64)
    assert trained.read_bytes() == folder.read_bytes()  # the output folder or its transformer/
    assert np.abs(_pixels(trained) - _pixels(base)).mean() > 0.1


def test_run_infer_with_a_full_config_renders_its_transformer(
    tiny_job: Path, model: Path, full_output: Path, full_config: list[str], tmp_path: Path
) -> None:
    workdir = WorkDir(tmp_path / "work")
    shutil.copytree(full_output, workdir.output)
    cfg = load_config(tiny_job, full_config)
    argv = shlex.split(f"--prompt '{PROMPT}' --steps 2 --seed 3 --guidance 3.5 --negative-prompt ''")
    (path,) = run_infer(_parser().parse_args(argv), JobContext(config=cfg, workdir=workdir))
    assert path.parent == workdir.output / "infer"

    settings = {**FAST, "guidance": 3.5, "max_sequence_length": cfg.job.max_token_length}
    (trained,) = infer(model, None, [PROMPT], tmp_path / "full", transformer=full_output, **settings)
    (base,) = infer(model, None, [PROMPT], tmp_path / "base", **settings)
    assert path.read_bytes() == trained.read_bytes()
    assert np.abs(_pixels(path) - _pixels(base)).mean() > 0.1


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--adapter", "out/pytorch_lora_weights.safetensors"], "--adapter takes a LoKr adapter"),
        (["--scale", "0.5"], "--scale is a LoKr adapter's strength"),
    ],
)
def test_lokr_options_are_refused_with_a_full_config(
    tiny_job: Path, full_config: list[str], tmp_path: Path, argv: list[str], error: str
) -> None:
    ctx = JobContext(config=load_config(tiny_job, full_config), workdir=WorkDir(tmp_path / "work"))
    with pytest.raises(ConfigError, match=error):
        run_infer(_parser().parse_args([*argv, "--prompt", PROMPT]), ctx)


def test_transformer_and_adapter_together_are_refused(model: Path, full_output: Path, adapter: Path) -> None:
    argv = ["--base-model", str(model), "--transformer", str(full_output), "--adapter", str(adapter)]
    with pytest.raises(ConfigError, match="--adapter takes a LoKr adapter"):
        run_infer(_parser().parse_args([*argv, "--prompt", PROMPT]), None)


def test_a_full_output_given_as_adapter_points_at_transformer(
    model: Path, full_output: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"holds a full-rank transformer.*--transformer"):
        infer(model, full_output, [PROMPT], tmp_path, **FAST)


def test_a_full_config_without_a_trained_transformer_is_a_config_error(
    tiny_job: Path, full_config: list[str], tmp_path: Path
) -> None:
    workdir = WorkDir(tmp_path / "work")
    workdir.output.mkdir(parents=True)
    ctx = JobContext(config=load_config(tiny_job, full_config), workdir=workdir)
    with pytest.raises(ConfigError, match=r"no config\.json there or in its transformer/"):
        run_infer(_parser().parse_args(["--prompt", PROMPT]), ctx)
