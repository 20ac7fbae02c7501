"""Validation images from the live transformer (LoKr in memory) with the tiny model."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from job.config.loader import ResolvedConfig, load_config
from job.model.lokr import attach_lokr, reset_lycoris_preset
from job.validate.prompts import validation_prompts
from job.validate.render import build_validation_pipeline, guidance_rescale, render_validation, rescale_guided


@pytest.fixture(scope="module")
def cfg(tiny_job: Path) -> ResolvedConfig:
    return load_config(tiny_job)


@pytest.fixture(scope="module")
def live(cfg: ResolvedConfig) -> Iterator[tuple[Any, Any]]:
    """The pipeline around a transformer carrying a LoKr whose weights are far from zero, and the LoKr."""
    from diffusers import AuraFlowTransformer2DModel

    transformer = AuraFlowTransformer2DModel.from_pretrained(cfg.job.model_source, subfolder="transformer")
    network = attach_lokr(transformer, cfg.lycoris, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    transformer.train()  # as the training loop leaves it
    yield build_validation_pipeline(cfg.job.model_source, transformer, torch.float32, "cpu"), network
    reset_lycoris_preset()


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_images_land_in_the_step_folder_by_nickname(
    live: tuple[Any, Any], cfg: ResolvedConfig, tmp_path: Path
) -> None:
    pipeline, _ = live
    paths = render_validation(pipeline, validation_prompts(cfg), cfg.job, 8, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "step-8/validation.png",
        "step-8/photo.png",
        "step-8/drawing.png",
    ]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    # Validation must hand the transformer back in training mode.
    assert pipeline.transformer.training


def test_several_resolutions_are_named_by_size(live: tuple[Any, Any], tiny_job: Path, tmp_path: Path) -> None:
    pipeline, _ = live
    job = load_config(tiny_job, ["validation_resolution=64x64,96x64"]).job
    paths = render_validation(pipeline, {"validation": "a red circle"}, job, 3, tmp_path)
    assert [p.name for p in paths] == ["validation-64x64.png", "validation-96x64.png"]
    assert Image.open(paths[1]).size == (96, 64)


def test_an_image_does_not_depend_on_what_was_rendered_before(
    live: tuple[Any, Any], cfg: ResolvedConfig, tmp_path: Path
) -> None:
    pipeline, _ = live
    prompts = {"a": "a red circle on blue", "b": "a green square on white"}
    forward = render_validation(pipeline, prompts, cfg.job, 1, tmp_path / "forward")
    backward = render_validation(pipeline, dict(reversed(prompts.items())), cfg.job, 1, tmp_path / "backward")
    by_name = {p.name: p.read_bytes() for p in backward}
    assert all(p.read_bytes() == by_name[p.name] for p in forward)
    assert forward[0].read_bytes() != forward[1].read_bytes()


def test_the_in_memory_lokr_is_what_renders(
    live: tuple[Any, Any], cfg: ResolvedConfig, tmp_path: Path
) -> None:
    from diffusers import AuraFlowPipeline

    pipeline, network = live
    prompts = {"validation": "a red circle on blue"}
    base = AuraFlowPipeline.from_pretrained(cfg.job.model_source)
    base.set_progress_bar_config(disable=True)
    (from_disk,) = render_validation(base, prompts, cfg.job, 0, tmp_path / "base")
    (with_lokr,) = render_validation(pipeline, prompts, cfg.job, 0, tmp_path / "lokr")
    network.set_multiplier(0.0)
    try:
        (lokr_off,) = render_validation(pipeline, prompts, cfg.job, 0, tmp_path / "off")
    finally:
        network.set_multiplier(1.0)
    assert np.array_equal(_pixels(lokr_off), _pixels(from_disk))
    assert np.abs(_pixels(with_lokr) - _pixels(from_disk)).mean() > 0.1


def test_rescale_matches_diffusers_rescale_noise_cfg() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    generator = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    torch.testing.assert_close(rescale_guided(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7))


def test_the_hook_makes_the_pipelines_guidance_come_out_rescaled(live: tuple[Any, Any]) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    transformer = live[0].transformer
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=generator),
        "timestep": torch.tensor([0.5, 0.5]),
        "return_dict": False,
    }
    scale, rescale = 4.0, 0.7
    with torch.no_grad():
        uncond, cond = transformer(**inputs)[0].chunk(2)
        with guidance_rescale(transformer, scale, rescale):
            hooked_uncond, hooked_cond = transformer(**inputs)[0].chunk(2)
    # What AuraFlowPipeline computes from the hooked output is the rescaled guidance.
    combined = hooked_uncond + scale * (hooked_cond - hooked_uncond)
    expected = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, rescale)
    torch.testing.assert_close(combined, expected, rtol=1e-4, atol=1e-5)
    assert not transformer._forward_hooks


def test_guidance_rescale_changes_validation_images(
    live: tuple[Any, Any], tiny_job: Path, tmp_path: Path
) -> None:
    pipeline, _ = live
    plain = load_config(tiny_job, ["validation_guidance=5"]).job
    rescaled = load_config(tiny_job, ["validation_guidance=5", "validation_guidance_rescale=0.7"]).job
    prompts = {"validation": "a red circle on blue"}
    (a,) = render_validation(pipeline, prompts, plain, 0, tmp_path / "plain")
    (b,) = render_validation(pipeline, prompts, rescaled, 0, tmp_path / "rescaled")
    assert a.read_bytes() != b.read_bytes()


def test_validation_lycoris_strength_changes_the_images_but_not_the_adapter(
    live: tuple[Any, Any], cfg: ResolvedConfig, tiny_job: Path, tmp_path: Path
) -> None:
    """SimpleTuner sets the LyCORIS multiplier to validation_lycoris_strength for validation renders
    (simpletuner/helpers/training/validation.py, ``Validation.setup_pipeline``)."""
    from job.model.lokr import save_adapter

    pipeline, network = live
    prompts = {"validation": "a red circle on blue"}
    save_adapter(network, tmp_path / "before.safetensors", cfg.lycoris)
    rendered = {}
    for strength in ("0", "1"):
        job = load_config(tiny_job, [f"validation_lycoris_strength={strength}"]).job
        (rendered[strength],) = render_validation(
            pipeline, prompts, job, 0, tmp_path / strength, adapter=network
        )
    network.set_multiplier(0.0)
    try:
        (lokr_off,) = render_validation(pipeline, prompts, cfg.job, 0, tmp_path / "off")
    finally:
        network.set_multiplier(1.0)
    assert np.array_equal(_pixels(rendered["0"]), _pixels(lokr_off))
    assert np.abs(_pixels(rendered["1"]) - _pixels(rendered["0"])).mean() > 0.1
    # Training continues at the multiplier it had, and the adapter it saves is byte for byte the same.
    assert network.multiplier == 1.0
    save_adapter(network, tmp_path / "after.safetensors", cfg.lycoris)
    assert (tmp_path / "before.safetensors").read_bytes() == (tmp_path / "after.safetensors").read_bytes()
