"""skip_file_discovery and text_encoder_batch_size: what warm looks for again, and how it batches captions."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

from job.cache import layout
from job.cache.dataset import TrainingData
from job.cache.warm import warm_caches
from job.check import build_report
from job.config.schema import JobConfig
from job.errors import ConfigError, DataError

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]


def _images(folder: Path, count: int, first: int = 0) -> None:
    for index in range(first, first + count):
        write_image(folder / f"photo{index}.png", seed=index)
        (folder / f"photo{index}.txt").write_text(f"caption number {index}")


def _photos_job(tmp_path: Path, model: Path, **dataset_settings: object) -> Path:
    images = tmp_path / "images"
    _images(images, 4)
    backend = dataset("photos", images, caption_strategy="textfile", **dataset_settings)
    return write_job(tmp_path, model, [backend], train_batch_size=2)


def test_skip_file_discovery_aspect_trusts_the_last_scan(tmp_path: Path, tiny_model: Path) -> None:
    """SimpleTuner's ``aspect`` stage (data_backend/factory.py: no bucket refresh) leaves files added
    since the last scan undiscovered; without it the next warm finds them."""
    config = _photos_job(tmp_path, tiny_model)
    work = tmp_path / "work"
    skip = ["skip_file_discovery=aspect"]
    first = warm_caches(open_job(config, work, skip))  # no earlier scan: the folder is walked
    assert first.datasets[0].images_found == 4

    _images(tmp_path / "images", 2, first=4)
    assert warm_caches(open_job(config, work, skip)).datasets[0].images_found == 4
    assert build_report(open_job(config, work, skip)).datasets[0].images == 4
    assert warm_caches(open_job(config, work)).datasets[0].images_found == 6


def test_skip_file_discovery_vae_and_text_leave_the_encoders_unused(tmp_path: Path, tiny_model: Path) -> None:
    """SimpleTuner's ``vae`` and ``text`` stages, read from the dataset's block as well as config.json
    (data_backend/factory.py): the dataset's latents and captions are not encoded, and training asks for
    a warm without them (SimpleTuner's own hint, caching/vae.py)."""
    config = _photos_job(tmp_path, tiny_model, skip_file_discovery="vae, text")
    ctx = open_job(config, tmp_path / "work")
    report = warm_caches(ctx)
    assert report.datasets[0].latents_new == 0 and not report.vae_loaded
    assert report.text_new == 2  # only the empty caption and the negative prompt
    with pytest.raises(DataError) as raised:
        TrainingData.open(ctx.config, ctx.workdir)
    assert "4 latents and 4 text embeddings are not cached" in raised.value.message
    assert "run lokr-job warm without skip_file_discovery text, vae" in raised.value.message


def test_skip_file_discovery_false_skips_nothing_and_an_unknown_stage_is_an_error(
    tmp_path: Path, tiny_model: Path
) -> None:
    """SimpleTuner's examples write ``"skip_file_discovery": false`` (e.g. examples/auraflow.peft-lora)."""
    config = _photos_job(tmp_path, tiny_model)
    assert (
        open_job(config, tmp_path / "work", ["skip_file_discovery=false"]).config.job.skip_file_discovery
        == ""
    )
    with pytest.raises(ConfigError) as raised:
        open_job(config, tmp_path / "work", ["skip_file_discovery=vae,latents"])
    assert (
        "config.json: skip_file_discovery: latents is not a stage SimpleTuner can skip"
        in raised.value.message
    )


def test_skip_file_discovery_does_not_change_the_recipe(tmp_path: Path, tiny_model: Path) -> None:
    config = _photos_job(tmp_path, tiny_model)
    plain = open_job(config, tmp_path / "work")
    skipping = open_job(config, tmp_path / "work", ["skip_file_discovery=vae", "text_encoder_batch_size=8"])
    assert plain.config.hash == skipping.config.hash


def test_text_encoder_batch_size_gives_the_same_embeddings(tmp_path: Path, tiny_model: Path) -> None:
    """SimpleTuner's default is one caption per encoder call (field registry sections/advanced.py,
    ``text_encoder_batch_size``); the text_embeds backend's own value wins (data_backend/factory.py). Larger
    batches pad every caption to the same length, so the cached embeddings are the same."""
    assert JobConfig.model_fields["text_encoder_batch_size"].default == 1
    config = _photos_job(tmp_path, tiny_model)
    one = open_job(config, tmp_path / "one", ["write_batch_size=1"])
    warm_caches(one)

    backends_path = config.parent / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    backends[-1]["text_encoder_batch_size"] = 4
    backends_path.write_text(json.dumps(backends))
    four = open_job(config, tmp_path / "four")
    assert four.config.text_embeds.text_encoder_batch_size == 4
    assert warm_caches(four).text_new == 6

    first = layout.text_dir(one.workdir, one.config.text_embeds)
    second = layout.text_dir(four.workdir, four.config.text_embeds)
    entries = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert len(entries) == 6
    for entry in entries:
        a, b = load_file(first / entry), load_file(second / entry)
        assert (a["prompt_mask"] == b["prompt_mask"]).all()
        assert (a["prompt_embeds"] - b["prompt_embeds"]).abs().max() < 1e-5
