"""TrainingData: batches from the caches alone, deterministic and positionable, never loading an encoder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

import job.cache.warm as warm_module
import job.model.components as components
from job.cache import layout
from job.cache.dataset import TrainingData
from job.cache.store import INDEX_NAME
from job.cache.warm import warm_caches
from job.errors import DataError

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]


@pytest.fixture
def warmed(tmp_path: Path, tiny_model: Path) -> Path:
    """Two datasets warmed: 12 photos (8 square, 4 wide; captions with two lines) and 3 regularisation images."""
    photos, regular = tmp_path / "photos", tmp_path / "regular"
    for index in range(12):
        size = (32, 32) if index < 8 else (64, 32)
        write_image(photos / f"p{index:02d}.png", size, seed=index)
        (photos / f"p{index:02d}.txt").write_text(f"photo {index}\nanother caption {index}\n")
    for index in range(3):
        write_image(regular / f"r{index}.png", seed=100 + index)
    config = write_job(
        tmp_path,
        tiny_model,
        [
            dataset("photos", photos, caption_strategy="textfile", caption_dropout_probability=0.25),
            dataset(
                "regular",
                regular,
                caption_strategy="instanceprompt",
                instance_prompt="a photo",
                is_regularisation_data=True,
                repeats=1,
            ),
        ],
        train_batch_size=2,
        validation_prompt="a red circle",
    )
    warm_caches(open_job(config, tmp_path / "work"))
    return config


def _open(config: Path, overrides: list[str] | None = None, **kwargs: int) -> TrainingData:
    ctx = open_job(config, config.parents[1] / "work", overrides)
    return TrainingData.open(ctx.config, ctx.workdir, **kwargs)


def test_training_never_loads_the_vae_or_text_encoder(warmed: Path, tiny_model: Path, monkeypatch) -> None:
    shutil.rmtree(tiny_model / "vae")
    shutil.rmtree(tiny_model / "text_encoder")

    def refuse(*args: object) -> None:
        raise AssertionError("training must not load an encoder")

    for module in (components, warm_module):
        monkeypatch.setattr(module, "load_vae", refuse)
        monkeypatch.setattr(module, "load_text_encoder", refuse)
    data = _open(warmed)
    batch = data.batch(0, 0)
    assert batch.latents.shape[0] == 2 and batch.latents.dtype == torch.float32
    assert batch.prompt_embeds.shape == (2, 16, 32) and batch.prompt_embeds.dtype == torch.float32
    assert batch.prompt_mask.shape == (2, 16) and batch.prompt_mask.dtype == torch.int64


def test_batches_per_epoch_and_what_a_batch_holds(warmed: Path) -> None:
    data = _open(warmed)
    # photos: 8 square → 4 batches, 4 wide → 2; regular: 3 × 2 = 6 samples → 3 batches.
    assert data.batches_per_epoch == 9
    seen = [data.batch(0, index) for index in range(data.batches_per_epoch)]
    for batch in seen:
        assert len({tuple(latent.shape) for latent in batch.latents}) == 1
        from_regular = [key.startswith("regular/") for key in batch.keys]
        assert batch.is_regularisation.tolist() == from_regular
        assert batch.caption_dropout.tolist() == [0.0 if r else 0.25 for r in from_regular]
    keys = [key for batch in seen for key in batch.keys]
    assert sorted(k for k in keys if k.startswith("photos/")) == sorted(
        f"photos/p{i:02d}.png" for i in range(12)
    )
    assert len([k for k in keys if k.startswith("regular/")]) == 6  # repeats 1: each image twice


def test_batches_are_a_pure_function_of_seed_epoch_and_index(warmed: Path) -> None:
    first, second = _open(warmed), _open(warmed)
    a, b = first.batch(1, 4), second.batch(1, 4)
    assert (
        a.keys == b.keys
        and torch.equal(a.latents, b.latents)
        and torch.equal(a.prompt_embeds, b.prompt_embeds)
    )
    epoch0 = [first.batch(0, i).keys for i in range(first.batches_per_epoch)]
    epoch1 = [first.batch(1, i).keys for i in range(first.batches_per_epoch)]
    assert epoch0 != epoch1
    # A new seed is a new plan (random crops depend on it); these crops do not, so nothing is encoded.
    assert warm_caches(open_job(warmed, warmed.parents[1] / "work", ["seed=8"])).encoded == 0
    reseeded = _open(warmed, ["seed=8"])
    assert [reseeded.batch(0, i).keys for i in range(reseeded.batches_per_epoch)] != epoch0


def test_ranks_split_each_global_batch(warmed: Path) -> None:
    # world 2 × batch 1 and world 1 × batch 2 draw the same global batches.
    whole = _open(warmed)
    ranks = [_open(warmed, ["train_batch_size=1"], world_size=2, rank=r) for r in range(2)]
    assert ranks[0].batches_per_epoch == whole.batches_per_epoch
    for index in range(whole.batches_per_epoch):
        assert ranks[0].batch(2, index).keys + ranks[1].batch(2, index).keys == whole.batch(2, index).keys


def test_multiline_captions_are_all_used(warmed: Path) -> None:
    data = _open(warmed)
    embeddings = set()
    for epoch in range(8):
        for index in range(data.batches_per_epoch):
            batch = data.batch(epoch, index)
            embeddings |= {
                round(embeds.sum().item(), 4)
                for key, embeds in zip(batch.keys, batch.prompt_embeds, strict=True)
                if key == "photos/p00.png"
            }
    assert len(embeddings) == 2


def test_null_and_validation_embeddings(warmed: Path) -> None:
    data = _open(warmed)
    embeds, mask = data.null_embedding()
    assert embeds.shape == (16, 32) and mask.tolist() == [1] + [0] * 15  # just the end-of-sequence token
    assert embeds[1:].abs().sum() == 0
    cached = data.sample_embedding("a red circle")
    assert cached is not None and cached[0].shape == (16, 32)
    assert data.sample_embedding("never warmed") is None


def test_opening_before_warm_says_run_warm(tmp_path: Path, tiny_model: Path) -> None:
    write_image(tmp_path / "images" / "a.png")
    config = write_job(tmp_path, tiny_model, [dataset("cold", tmp_path / "images")])
    with pytest.raises(DataError, match=r"'cold' has no cache plan.*run lokr-job warm"):
        _open(config)


def test_a_config_change_that_changes_keys_needs_a_warm(warmed: Path) -> None:
    with pytest.raises(DataError, match="built for other settings"):
        _open(warmed, ["resolution=48"])
    assert _open(warmed, ["caption_dropout_probability=0.5"]).batches_per_epoch == 9  # read at training time


def test_an_incomplete_cache_needs_a_warm(warmed: Path) -> None:
    ctx = open_job(warmed, warmed.parents[1] / "work")
    index_path = layout.latent_dir(ctx.workdir, ctx.config.datasets[0]) / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["entries"].pop(next(iter(index["entries"])))
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="'photos': 1 latents and 0 text embeddings are not cached"):
        _open(warmed)


def test_a_deleted_cache_file_is_a_data_error_not_a_crash(warmed: Path) -> None:
    ctx = open_job(warmed, warmed.parents[1] / "work")
    for path in layout.latent_dir(ctx.workdir, ctx.config.datasets[0]).rglob("*.safetensors"):
        path.unlink()
    data = _open(warmed)
    with pytest.raises(DataError, match="missing or unreadable"):
        for index in range(data.batches_per_epoch):
            data.batch(0, index)


def test_a_larger_world_can_leave_a_dataset_without_usable_buckets(warmed: Path) -> None:
    with pytest.raises(DataError, match=r"'photos'.*world size 8"):
        _open(warmed, world_size=8)
