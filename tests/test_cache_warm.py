"""lokr-job warm: encode only what is missing, with keys that change exactly when the result would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

import job.cache.fill as fill_module
import job.cache.warm as warm_module
from job.cache import layout
from job.cache.keys import noise_seed
from job.cache.manifest import read_manifest
from job.cache.store import INDEX_NAME, entry_path
from job.cache.warm import warm_caches
from job.errors import ConfigError, DataError
from job.model.components import compute_device, compute_device_type, job_geometry

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]


def _forbid_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a warm with nothing missing must not load a model")

    monkeypatch.setattr(warm_module, "load_vae", refuse)
    monkeypatch.setattr(warm_module, "load_text_encoder", refuse)


def _captioned_images(
    folder: Path, count: int, size: tuple[int, int] = (32, 32), first_seed: int = 0
) -> None:
    for index in range(count):
        write_image(folder / f"img{index:03d}.png", size, seed=first_seed + index)
        (folder / f"img{index:03d}.txt").write_text(f"caption number {first_seed + index}")


@pytest.fixture
def small_job(tmp_path: Path, tiny_model: Path) -> Path:
    """Six captioned images: four square, two wide (so crop settings change some of them)."""
    images = tmp_path / "images"
    _captioned_images(images, 4)
    _captioned_images(images / "wide", 2, size=(64, 32), first_seed=100)
    return write_job(tmp_path, tiny_model, [dataset("small", images, caption_strategy="textfile")])


def test_2000_images_warm_once_then_cost_nothing(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    images = tmp_path / "images"
    for index in range(2000):
        write_image(images / f"{index // 500}" / f"photo_number_{index}.png", (32, 32), seed=index)
    config = write_job(
        tmp_path,
        tiny_model,
        [dataset("many", images, caption_strategy="filename", crop=True)],
        vae_batch_size=64,
        write_batch_size=256,
    )
    ctx = open_job(config, tmp_path / "work")

    first = warm_caches(ctx)
    (report,) = first.datasets
    assert (report.images_found, report.usable_images, report.latents_new, report.latents_cached) == (
        2000,
        2000,
        2000,
        0,
    )
    assert first.text_new == 2002  # 2000 captions, the empty caption, the default negative prompt
    assert first.vae_loaded and first.text_encoder_loaded

    _forbid_model_loading(monkeypatch)
    second = warm_caches(ctx)
    assert second.encoded == 0
    assert (second.datasets[0].latents_cached, second.text_cached) == (2000, 2002)
    assert not second.vae_loaded and not second.text_encoder_loaded
    assert second.datasets[0].probed == 0


def _imported(importtime_log: str) -> set[str]:
    """The modules a ``python -X importtime`` process imported, from its stderr."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:")
    }


def test_a_warm_with_everything_cached_imports_neither_torch_nor_diffusers(
    small_job: Path, tmp_path: Path
) -> None:
    warm_caches(open_job(small_job, tmp_path / "work"))
    command = ["warm", "--config", str(small_job), "--workdir", str(tmp_path / "work")]
    second = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "job", *command], capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "latents: 6 cached, 0 new" in second.stderr
    imported = _imported(second.stderr)
    assert "job.cache.warm" in imported  # the log lists what the process imported
    heavy = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "PIL"}
    assert imported & heavy == set()


def test_the_device_named_without_importing_torch_is_the_one_torch_picks() -> None:
    # The text cache's keys name the encoder's dtype, which follows the device: both answers must agree.
    assert compute_device_type() == compute_device().type


def test_changing_one_caption_reencodes_one_text_embedding(small_job: Path, tmp_path: Path) -> None:
    ctx = open_job(small_job, tmp_path / "work")
    warm_caches(ctx)
    (tmp_path / "images" / "img002.txt").write_text("a brand new caption")
    again = warm_caches(ctx)
    assert (again.text_new, again.latents_new) == (1, 0)
    assert not again.vae_loaded


def test_changing_resolution_reencodes_every_latent_and_no_text(small_job: Path, tmp_path: Path) -> None:
    warm_caches(open_job(small_job, tmp_path / "work"))
    again = warm_caches(open_job(small_job, tmp_path / "work", ["resolution=48"]))
    assert (again.latents_new, again.text_new) == (6, 0)
    assert not again.text_encoder_loaded


def test_changing_crop_reencodes_only_the_images_it_changes(small_job: Path, tmp_path: Path) -> None:
    backends = small_job.parent / "multidatabackend.json"
    warm_caches(open_job(small_job, tmp_path / "work"))
    entries = json.loads(backends.read_text())
    entries[0].update(crop=True, crop_aspect="square", crop_style="center")
    backends.write_text(json.dumps(entries))
    again = warm_caches(open_job(small_job, tmp_path / "work"))
    assert again.latents_new == 2  # the two wide images; the square ones keep their transform


def test_changing_the_vae_reencodes_latents_only(small_job: Path, tmp_path: Path, tiny_model: Path) -> None:
    warm_caches(open_job(small_job, tmp_path / "work"))
    weights = tiny_model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    again = warm_caches(open_job(small_job, tmp_path / "work"))
    assert (again.latents_new, again.text_new) == (6, 0)


def test_a_killed_warm_keeps_what_it_wrote(small_job: Path, tmp_path: Path, monkeypatch) -> None:
    ctx = open_job(small_job, tmp_path / "work")
    warm_caches(ctx)
    (layout.latent_dir(ctx.workdir, ctx.config.datasets[0]) / INDEX_NAME).unlink()
    (layout.text_dir(ctx.workdir, ctx.config.text_embeds) / INDEX_NAME).unlink()
    _forbid_model_loading(monkeypatch)
    again = warm_caches(ctx)
    assert again.encoded == 0 and again.datasets[0].latents_cached == 6
    # What it adopted is indexed again: the next warm reads one index, not one stat per entry.
    latent_index = json.loads(
        (layout.latent_dir(ctx.workdir, ctx.config.datasets[0]) / INDEX_NAME).read_text()
    )
    assert len(latent_index["entries"]) == 6
    assert (layout.text_dir(ctx.workdir, ctx.config.text_embeds) / INDEX_NAME).exists()


def test_caches_match_what_the_auraflow_pipeline_computes(
    small_job: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from diffusers import AuraFlowPipeline

    from job.cache.encode import image_to_pixels
    from job.data.images import decode_rgb
    from job.data.transform import apply_transform

    ctx = open_job(small_job, tmp_path / "work")
    warm_caches(ctx)
    manifest = read_manifest(layout.manifest_path(ctx.workdir, "small"))
    assert manifest is not None
    pipe = AuraFlowPipeline.from_pretrained(tiny_model)

    caption = "caption number 1"
    sample = next(s for s in manifest.samples if s.relpath == "img001.png")
    cached = load_file(entry_path(layout.text_dir(ctx.workdir, ctx.config.text_embeds), sample.text_keys[0]))
    embeds, _, _, _ = pipe.encode_prompt(
        caption, do_classifier_free_guidance=False, max_sequence_length=16, device=torch.device("cpu")
    )
    # Equal up to float noise: warm encoded the caption in a batch, the pipeline alone.
    torch.testing.assert_close(cached["prompt_embeds"], embeds[0], rtol=1e-5, atol=1e-6)
    expected_mask = pipe.tokenizer(
        caption, max_length=16, padding="max_length", return_tensors="pt"
    ).attention_mask
    assert torch.equal(cached["prompt_mask"], expected_mask[0])
    assert cached["prompt_mask"].sum() < 16 and cached["prompt_embeds"][-1].abs().sum() == 0  # padding zeroed

    latent = load_file(entry_path(layout.latent_dir(ctx.workdir, ctx.config.datasets[0]), sample.latent_key))[
        "latents"
    ]
    image = decode_rgb((tmp_path / "images" / "img001.png").read_bytes())
    from job.data.scan import scan_dataset  # the transform warm used, recomputed independently

    (scanned,) = [
        s
        for s in scan_dataset(
            ctx.config.datasets[0],
            tmp_path / "images",
            job_geometry(ctx.config.job, tiny_model),
            seed=7,
            aspect_rounding=None,
            probe_path=tmp_path / "probe.json",
        ).samples
        if s.relpath == "img001.png"
    ]
    pixels = image_to_pixels(apply_transform(image, scanned.transform))[None]
    generator = torch.Generator().manual_seed(noise_seed(sample.latent_key))
    with torch.no_grad():
        expected = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    assert latent.shape == (4, 4, 4)
    torch.testing.assert_close(latent, expected[0])


def test_bad_data_is_skipped_and_reported(tmp_path: Path, tiny_model: Path) -> None:
    images = tmp_path / "images"
    _captioned_images(images, 3)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("hello")
    write_image(images / "small.png", (8, 8), seed=9)
    (images / "small.txt").write_text("small")
    write_image(images / "nocaption.png", seed=10)
    config = write_job(
        tmp_path, tiny_model, [dataset("mixed", images, caption_strategy="textfile", minimum_image_size=16)]
    )
    ctx = open_job(config, tmp_path / "work")
    result = warm_caches(ctx)
    (report,) = result.datasets
    assert (report.images_found, report.usable_images, len(report.skipped), report.latents_new) == (
        7,
        3,
        4,
        3,
    )
    written = json.loads(layout.report_path(ctx.workdir, "mixed").read_text())
    assert {item["path"] for item in written["skipped"]} == {
        "empty.png",
        "notes.jpg",
        "small.png",
        "nocaption.png",
    }
    assert all(item["reason"] for item in written["skipped"])
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [f"img00{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
        + ["empty.png", "notes.jpg", "small.png", "small.txt", "nocaption.png"]
    )  # nothing written into the user's folder


def test_everything_skipped_is_a_data_error_with_the_reasons(tmp_path: Path, tiny_model: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    (images / "b.png").write_bytes(b"")
    write_image(images / "c.png")
    config = write_job(tmp_path, tiny_model, [dataset("broken", images, caption_strategy="textfile")])
    with pytest.raises(DataError) as raised:
        warm_caches(open_job(config, tmp_path / "work"))
    assert raised.value.exit_code == 3
    message = raised.value.message
    assert "'broken'" in message and "none of its 3 images" in message
    assert "empty file ×2" in message and "missing caption file ×1" in message


def test_an_empty_folder_is_a_data_error(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "images").mkdir()
    config = write_job(tmp_path, tiny_model, [dataset("empty", tmp_path / "images")])
    with pytest.raises(DataError, match="no images"):
        warm_caches(open_job(config, tmp_path / "work"))


def test_buckets_too_small_for_a_step(tmp_path: Path, tiny_model: Path) -> None:
    images = tmp_path / "images"
    _captioned_images(images, 4)
    _captioned_images(images / "wide", 1, size=(64, 32), first_seed=50)
    config = write_job(
        tmp_path, tiny_model, [dataset("d", images, caption_strategy="textfile")], train_batch_size=2
    )
    result = warm_caches(open_job(config, tmp_path / "work"))
    (report,) = result.datasets
    assert report.dropped_images == 1 and len(report.dropped) == 1 and report.latents_new == 4
    with pytest.raises(DataError, match="raise repeats to at least 1"):
        warm_caches(open_job(config, tmp_path / "work", ["train_batch_size=8"]))


def test_a_resolution_past_the_positional_grid_is_a_config_error(small_job: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'small': resolution 2048"):
        warm_caches(open_job(small_job, tmp_path / "work", ["resolution=2048"]))


def test_relative_cache_dirs_live_in_the_work_directory(tmp_path: Path, tiny_model: Path) -> None:
    images = tmp_path / "images"
    _captioned_images(images, 2)
    entry = dataset("d", images, caption_strategy="textfile", cache_dir_vae="cache/vae/d")
    config = write_job(tmp_path, tiny_model, [entry])
    ctx = open_job(config, tmp_path / "work")
    warm_caches(ctx)
    assert (tmp_path / "work" / "cache" / "vae" / "d" / INDEX_NAME).is_file()
    assert (tmp_path / "work" / "cache" / "text" / INDEX_NAME).is_file()
    assert (tmp_path / "work" / "cache" / "buckets" / "d.json").is_file()


def test_validation_prompts_are_cached(small_job: Path, tmp_path: Path) -> None:
    ctx = open_job(small_job, tmp_path / "work", ["validation_prompt=a red circle"])
    result = warm_caches(ctx)
    assert result.text_new == 6 + 3  # captions, "", the negative prompt, the validation prompt


def test_the_warm_command_exits_0_then_3_on_bad_data(small_job: Path, tmp_path: Path) -> None:
    from job.cli import main

    arguments = ["warm", "--config", str(small_job), "--workdir", str(tmp_path / "work")]
    assert main(arguments) == 0
    for image in (tmp_path / "images").rglob("*.png"):
        image.write_bytes(b"")
    assert main(arguments) == 3


def test_an_image_that_fails_to_encode_is_reported_and_left_out(
    small_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read = fill_module.read_image_file

    def edited_during_warm(path: Path):
        data, image = real_read(path)
        return (data + b"edited" if path == tmp_path / "images" / "img001.png" else data), image

    monkeypatch.setattr(fill_module, "read_image_file", edited_during_warm)
    ctx = open_job(small_job, tmp_path / "work")
    (report,) = warm_caches(ctx).datasets
    assert report.latents_new == 5 and report.usable_images == 5
    assert [(f.relpath, f.reason.split(":")[0]) for f in report.failed] == [
        ("img001.png", "changed during warm")
    ]
    manifest = read_manifest(layout.manifest_path(ctx.workdir, "small"))
    assert manifest is not None and "img001.png" not in {s.relpath for s in manifest.samples}

    monkeypatch.undo()
    again = warm_caches(ctx)
    assert again.latents_new == 1 and not again.datasets[0].failed


def test_hub_caption_strategy_on_a_folder_is_a_config_error(tmp_path: Path, tiny_model: Path) -> None:
    write_image(tmp_path / "images" / "a.png")
    config = write_job(
        tmp_path, tiny_model, [dataset("d", tmp_path / "images", caption_strategy="huggingface")]
    )
    with pytest.raises(ConfigError, match="'d': caption_strategy huggingface"):
        warm_caches(open_job(config, tmp_path / "work"))


def test_slicing_keeps_the_latents_and_tiling_keeps_its_own(small_job: Path, tmp_path: Path) -> None:
    """vae_enable_slicing changes no latent (the cache is reused as is); vae_enable_tiling changes them
    (tile seams), so its latents are cached apart and switching it back finds the untiled ones."""
    work = tmp_path / "work"
    assert warm_caches(open_job(small_job, work)).latents_new == 6
    sliced = warm_caches(open_job(small_job, work, ["vae_enable_slicing=true"]))
    assert (sliced.latents_new, sliced.vae_loaded) == (0, False)
    tiled = warm_caches(open_job(small_job, work, ["vae_enable_tiling=true"]))
    assert tiled.latents_new == 6
    assert warm_caches(open_job(small_job, work)).latents_new == 0
