"""vae_cache_ondemand: warm leaves the latents to training, which encodes each on first use and caches it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

import job.cache.ondemand as ondemand
from job.cache import layout
from job.cache.dataset import TrainingData
from job.cache.manifest import read_manifest
from job.cache.store import entry_path
from job.cache.warm import warm_caches
from job.errors import DataError
from job.model.components import compute_device, load_vae

# Warm encodes vae_batch_size images per VAE call, training one: the convolutions sum in another order.
BATCHING_TOLERANCE = 1e-5

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_datasets(root: Path, model: Path, *, lazy: bool = True, **job: object) -> Path:
    """Two captioned datasets of four 32x32 images each; ``lazy`` asks for on-demand latents itself unless
    told not to."""
    for name in ("eager", "lazy"):
        for index in range(4):
            write_image(
                root / name / f"{name}{index}.png", (32, 32), seed=index + (100 if name == "lazy" else 0)
            )
            (root / name / f"{name}{index}.txt").write_text(f"{name} caption {index}")
    backends = [
        dataset("eager", root / "eager", caption_strategy="textfile"),
        dataset("lazy", root / "lazy", caption_strategy="textfile", vae_cache_ondemand=lazy),
    ]
    return write_job(root, model, backends, train_batch_size=2, **job)


def all_latents(data: TrainingData) -> dict[str, torch.Tensor]:
    """Every sample's latent, by key, reading every batch of the first epoch."""
    latents: dict[str, torch.Tensor] = {}
    for index in range(data.batches_per_epoch):
        batch = data.batch(0, index)
        latents.update(zip(batch.keys, batch.latents, strict=True))
    return latents


def test_warm_leaves_an_on_demand_datasets_latents_and_training_encodes_them(
    tmp_path: Path, tiny_model: Path
) -> None:
    ctx = open_job(two_datasets(tmp_path, tiny_model), tmp_path / "work")
    report = warm_caches(ctx)
    eager, lazy = report.datasets
    assert (eager.latents_new, lazy.latents_new) == (4, 0)
    assert report.text_new > 0  # captions are still warmed
    manifest = read_manifest(layout.manifest_path(ctx.workdir, "lazy"))
    assert manifest is not None and all(s.source is not None for s in manifest.samples)
    lazy_dir = layout.latent_dir(ctx.workdir, ctx.config.datasets[1])
    assert not any(entry_path(lazy_dir, s.latent_key).exists() for s in manifest.samples)

    data = TrainingData.open(ctx.config, ctx.workdir)
    latents = all_latents(data)
    assert data.on_demand is not None and data.on_demand.encoded == 4
    assert all(entry_path(lazy_dir, s.latent_key).is_file() for s in manifest.samples)

    # The next warm indexes them, and so uploads the cache shards again (cache_uri, job.cache.remote).
    rewarmed = warm_caches(ctx)
    assert (rewarmed.adopted, rewarmed.datasets[1].latents_cached, rewarmed.changed) == (4, 4, True)
    assert not warm_caches(ctx).changed

    # A second run (a resumed one) reads what the first encoded: no VAE, the same tensors.
    again = TrainingData.open(ctx.config, ctx.workdir)
    assert torch.equal(torch.stack(list(all_latents(again).values())), torch.stack(list(latents.values())))
    assert again.on_demand is not None and again.on_demand.encoded == 0


def test_on_demand_latents_are_the_ones_warm_writes(tmp_path: Path, tiny_model: Path) -> None:
    on_demand = open_job(two_datasets(tmp_path / "a", tiny_model), tmp_path / "a" / "work")
    warm_caches(on_demand)
    encoded = all_latents(TrainingData.open(on_demand.config, on_demand.workdir))

    ahead = open_job(two_datasets(tmp_path / "b", tiny_model, lazy=False), tmp_path / "b" / "work")
    assert warm_caches(ahead).datasets[1].latents_new == 4
    warmed = all_latents(TrainingData.open(ahead.config, ahead.workdir))
    assert sorted(encoded) == sorted(warmed)
    for key in encoded:
        assert torch.allclose(encoded[key], warmed[key], atol=BATCHING_TOLERANCE, rtol=0), key


def test_the_flag_does_not_change_the_recipe(tmp_path: Path, tiny_model: Path) -> None:
    config = two_datasets(tmp_path, tiny_model)
    plain = open_job(config, tmp_path / "a")
    everything = open_job(config, tmp_path / "b", ["vae_cache_ondemand=true"])
    assert plain.config.hash == everything.config.hash
    assert warm_caches(everything).datasets[0].latents_new == 0  # config.json's flag covers every dataset


def spy_on_vae_moves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The devices the on-demand VAE is moved to after loading (the real VAE, its ``to`` recorded)."""
    moves: list[str] = []

    def load_and_watch(*args: object, **kwargs: object):
        vae = load_vae(*args, **kwargs)
        move = vae.to
        vae.to = lambda device: (moves.append(str(device)), move(device))[1]
        return vae

    monkeypatch.setattr(ondemand, "load_vae", load_and_watch)
    return moves


@pytest.mark.parametrize("offload", [False, True])
def test_offload_during_startup_moves_the_vae_to_the_gpu_for_each_encode_only(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, offload: bool
) -> None:
    ctx = open_job(
        two_datasets(tmp_path, tiny_model), tmp_path / "work", [f"offload_during_startup={offload}"]
    )
    warm_caches(ctx)
    moves = spy_on_vae_moves(monkeypatch)
    all_latents(TrainingData.open(ctx.config, ctx.workdir))
    device = str(compute_device())
    assert moves == ([device, "cpu"] * 4 if offload else [])


def test_the_vae_is_released_once_every_latent_is_cached(tmp_path: Path, tiny_model: Path, caplog) -> None:
    ctx = open_job(two_datasets(tmp_path, tiny_model), tmp_path / "work")
    warm_caches(ctx)
    data = TrainingData.open(ctx.config, ctx.workdir)
    with caplog.at_level("INFO", logger="lokr"):
        all_latents(data)
    assert "vae_cache_ondemand: every latent is cached; the VAE is released" in caplog.text
    assert data.on_demand is not None and not data.on_demand.holds_vae


def test_offload_during_startup_encodes_the_same_latents_in_the_same_run(
    tmp_path: Path, tiny_model: Path
) -> None:
    config = two_datasets(tmp_path, tiny_model)
    plain = open_job(config, tmp_path / "plain")
    parked = open_job(config, tmp_path / "parked", ["offload_during_startup=true"])
    assert parked.config.job.offload_during_startup and not parked.config.warnings
    assert parked.config.hash == plain.config.hash  # a memory setting: the same run
    latents = []
    for ctx in (plain, parked):
        warm_caches(ctx)
        latents.append(all_latents(TrainingData.open(ctx.config, ctx.workdir)))
    assert all(torch.equal(latents[0][key], latents[1][key]) for key in latents[0])


def test_a_changed_image_is_a_data_error_naming_it(tmp_path: Path, tiny_model: Path) -> None:
    ctx = open_job(two_datasets(tmp_path, tiny_model), tmp_path / "work")
    warm_caches(ctx)
    write_image(tmp_path / "lazy" / "lazy2.png", (32, 32), seed=999)
    data = TrainingData.open(ctx.config, ctx.workdir)
    with pytest.raises(DataError) as raised:
        all_latents(data)
    assert (
        "dataset 'lazy': lazy2.png changed since warm planned it; run lokr-job warm" in raised.value.message
    )


@pytest.mark.slow
def test_a_tiny_on_demand_run_ends_with_the_adapter_a_warmed_run_trains(
    tmp_path: Path, tiny_model: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    adapters = []
    for flag in ("false", "true"):
        root = tmp_path / flag
        config = two_datasets(root, tiny_model, lazy=False, max_train_steps=3)
        workdir = root / "work"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "job",
                "run",
                "--config",
                str(config),
                "--workdir",
                str(workdir),
                "--set",
                f"vae_cache_ondemand={flag}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert ("loading the VAE to encode latents as training first reads them" in result.stderr) == (
            flag == "true"
        )
        adapters.append(load_file(workdir / "output" / "pytorch_lora_weights.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(
        torch.allclose(adapters[0][k], adapters[1][k], atol=BATCHING_TOLERANCE, rtol=0) for k in adapters[0]
    )
