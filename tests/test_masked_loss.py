"""Masked loss in SimpleTuner's layout: a conditioning_type mask backend linked by conditioning_data; every
image's mask cached beside its latent at latent resolution; dark regions out of the loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job
from test_train_loop import FakeData, make_batch, make_job, make_trainer

from job.cache import layout
from job.cache.dataset import TrainingData
from job.cache.manifest import read_manifest
from job.cache.warm import warm_caches
from job.errors import ConfigError, DataError
from job.flow_matching import draw_step, flow_target, noisy_latents, step_generator
from job.train.loss import training_loss
from job.train.state import TrainState

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_mask(path: Path, size: tuple[int, int], white_from_x: int, mode: str = "L") -> None:
    """A mask black left of ``white_from_x`` and white from there on."""
    width, height = size
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, white_from_x:] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def mask_backend(mask_id: str, folder: Path, **settings: object) -> dict[str, object]:
    return dataset(
        mask_id, folder, **{"dataset_type": "conditioning", "conditioning_type": "mask", **settings}
    )


def masked_job(root: Path, model: Path, *, count: int = 4, **job: object) -> Path:
    """``count`` captioned 32x32 images, each with a mask black on its left quarter, white elsewhere."""
    images, masks = root / "images", root / "masks"
    for index in range(count):
        write_image(images / f"img{index}.png", (32, 32), seed=index)
        (images / f"img{index}.txt").write_text(f"caption {index}")
        write_mask(masks / f"img{index}.png", (32, 32), white_from_x=8, mode="RGB" if index % 2 else "L")
    backends = [
        dataset("photos", images, caption_strategy="textfile", conditioning_data="photo-masks"),
        mask_backend("photo-masks", masks),
    ]
    return write_job(root, model, backends, **job)


def test_simpletuners_dreambooth_layout_links_the_mask(tmp_path: Path, tiny_model: Path) -> None:
    ctx = open_job(masked_job(tmp_path, tiny_model), tmp_path / "work")
    (photos,) = ctx.config.datasets
    mask = ctx.config.mask_for(photos)
    assert mask is not None and mask.id == "photo-masks"
    assert [b.id for b in ctx.config.backends] == ["photos", "photo-masks"]
    assert ctx.config.recipe["datasets"][1]["conditioning_type"] == "mask"


def test_the_link_can_be_written_on_the_mask_backend(tmp_path: Path, tiny_model: Path) -> None:
    write_image(tmp_path / "images" / "a.png")
    (tmp_path / "masks").mkdir()
    config = write_job(
        tmp_path,
        tiny_model,
        [
            dataset("photos", tmp_path / "images"),
            mask_backend("m", tmp_path / "masks", source_dataset_id="photos"),
        ],
    )
    ctx = open_job(config, tmp_path / "work")
    assert ctx.config.datasets[0].conditioning_data == "m"
    assert ctx.config.mask_for(ctx.config.datasets[0]).id == "m"


@pytest.mark.parametrize(
    ("backends", "expected"),
    [
        (
            [dataset("photos", Path("images"), conditioning_data="nope")],
            "(backend 'photos'): conditioning_data: no backend with dataset_type conditioning has id 'nope'",
        ),
        (
            [dataset("photos", Path("images")), mask_backend("m", Path("masks"))],
            "(backend 'm'): no image backend names this mask backend; add conditioning_data: 'm'",
        ),
        (
            [
                dataset("photos", Path("images"), conditioning_data="m"),
                mask_backend("m", Path("masks"), disabled=True),
            ],
            "conditioning_data: mask backend 'm' is disabled",
        ),
        (
            [
                dataset("photos", Path("images"), conditioning_data="m"),
                mask_backend("m", Path("masks"), conditioning_type="segmentation"),
            ],
            "segmentation masks (random per-class masking, masked_loss_probability) are not implemented",
        ),
        (
            [
                dataset("photos", Path("images"), conditioning_data="m"),
                mask_backend("m", Path("masks"), conditioning_type="reference_strict"),
            ],
            "reference_strict conditioning feeds an image to the model, which AuraFlow cannot take",
        ),
    ],
    ids=["dangling", "unlinked", "disabled", "segmentation", "reference"],
)
def test_a_broken_mask_layout_is_a_config_error_naming_the_backend(
    tmp_path: Path, tiny_model: Path, backends: list[dict[str, object]], expected: str
) -> None:
    write_image(tmp_path / "images" / "a.png")
    (tmp_path / "masks").mkdir()
    for backend in backends:
        backend["instance_data_dir"] = str(tmp_path / str(backend["instance_data_dir"]))
    config = write_job(tmp_path, tiny_model, backends)
    with pytest.raises(ConfigError) as raised:
        open_job(config, tmp_path / "work")
    assert expected in raised.value.message


@pytest.mark.parametrize("link", ["conditioning_data", "source_dataset_id"])
def test_the_mask_of_a_disabled_image_backend_goes_unused_with_it(
    tmp_path: Path, tiny_model: Path, link: str
) -> None:
    for name in ("photos", "other"):
        write_image(tmp_path / name / "a.png")
    (tmp_path / "masks").mkdir()
    photos = dataset("photos", tmp_path / "photos", disabled=True)
    mask = mask_backend("m", tmp_path / "masks")
    if link == "conditioning_data":
        photos["conditioning_data"] = "m"
    else:
        mask["source_dataset_id"] = "photos"
    config = write_job(tmp_path, tiny_model, [photos, dataset("other", tmp_path / "other"), mask])
    ctx = open_job(config, tmp_path / "work")
    assert [d.id for d in ctx.config.datasets] == ["other"] and ctx.config.masks == []


def test_warm_caches_each_mask_at_latent_resolution_beside_its_latent(
    tmp_path: Path, tiny_model: Path
) -> None:
    ctx = open_job(masked_job(tmp_path, tiny_model), tmp_path / "work")
    report = warm_caches(ctx)
    (photos,) = report.datasets
    # Content-keyed: the four masks are two distinct files (greyscale and RGB), cropped alike.
    assert (photos.masks_cached, photos.masks_new) == (0, 2)
    stored = json.loads(layout.report_path(ctx.workdir, "photos").read_text())
    assert stored["masks"] == {"cached": 0, "new": 2}

    manifest = read_manifest(layout.manifest_path(ctx.workdir, "photos"))
    assert manifest is not None and all(sample.mask_key for sample in manifest.samples)
    # 32x32 pixels → a 4x4 latent (the VAE downsamples by 8): the black quarter is the first column.
    data = TrainingData.open(ctx.config, ctx.workdir)
    batch = data.batch(0, 0)
    assert batch.loss_mask is not None
    assert batch.loss_mask.shape == (1, 1, *batch.latents.shape[-2:]) == (1, 1, 4, 4)
    expected = torch.ones(1, 1, 4, 4)
    expected[..., 0] = 0
    assert torch.equal(batch.loss_mask, expected)

    again = warm_caches(ctx)
    assert (again.datasets[0].masks_cached, again.datasets[0].masks_new) == (2, 0)


def test_a_mask_is_averaged_over_the_pixels_of_each_latent_position(tmp_path: Path, tiny_model: Path) -> None:
    """A black edge at x = 12 splits the second latent column (pixels 8..15): half of it counts."""
    ctx = open_job(masked_job(tmp_path, tiny_model, count=1), tmp_path / "work")
    write_mask(tmp_path / "masks" / "img0.png", (32, 32), white_from_x=12)
    warm_caches(ctx)
    mask = TrainingData.open(ctx.config, ctx.workdir).batch(0, 0).loss_mask
    assert mask is not None
    assert mask[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.0]


def test_an_unmasked_dataset_has_no_mask_and_its_plan_is_unchanged(tmp_path: Path, tiny_model: Path) -> None:
    write_image(tmp_path / "images" / "a.png")
    ctx = open_job(
        write_job(tmp_path, tiny_model, [dataset("photos", tmp_path / "images")]), tmp_path / "work"
    )
    warm_caches(ctx)
    stored = json.loads(layout.manifest_path(ctx.workdir, "photos").read_text())
    assert len(stored["samples"][0]) == 5  # relpath, width, height, latent key, text keys: no mask key
    assert TrainingData.open(ctx.config, ctx.workdir).batch(0, 0).loss_mask is None


def test_a_missing_or_mismatched_mask_stops_warm_before_encoding_naming_each_image(
    tmp_path: Path, tiny_model: Path
) -> None:
    ctx = open_job(masked_job(tmp_path, tiny_model), tmp_path / "work")
    masks = tmp_path / "masks"
    (masks / "img1.png").unlink()
    write_mask(masks / "img1.jpg", (32, 32), white_from_x=0)
    write_mask(masks / "img2.png", (32, 16), white_from_x=0)
    with pytest.raises(DataError) as raised:
        warm_caches(ctx)
    message = raised.value.message
    assert "dataset 'photos': 2 of its 4 images have no usable mask in mask backend 'photo-masks'" in message
    assert (
        f"img1.png: no mask {masks / 'img1.png'} (img1.jpg is there: masks are matched by the whole name"
        in message
    )
    assert "img2.png: its mask is 32x16 but the image is 32x32" in message
    assert not (ctx.workdir.latents("photos")).exists()  # nothing was encoded


def test_check_and_warm_exit_3_on_a_missing_mask(tmp_path: Path, tiny_model: Path) -> None:
    config = masked_job(tmp_path, tiny_model)
    (tmp_path / "masks" / "img3.png").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ("check", "warm"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "job",
                command,
                "--config",
                str(config),
                "--workdir",
                str(tmp_path / "work"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 3, (command, result.stderr[-3000:])
        assert "img3.png: no mask" in result.stderr + result.stdout, command


def test_the_masked_loss_is_the_one_computed_by_hand() -> None:
    trainer = make_trainer(make_job(), FakeData())
    batch = make_batch(11)
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, :, :3] = 0.0
    mask[1, :, 2:5, :] = 0.25
    batch.loss_mask = mask
    with torch.no_grad():
        loss = trainer.micro_batch_loss(batch, step_generator(7, 0, 0), 0)
        # By hand: the step's draws, the model's prediction, (prediction - target)² weighted and averaged
        # over every position (SimpleTuner divides by all of them, not by the mask's area).
        draws = draw_step(step_generator(7, 0, 0), batch.latents.shape, shift=3.0)
        noisy = noisy_latents(batch.latents, draws.noise, draws.sigmas)
        prediction = trainer.predict(noisy, batch.prompt_embeds, batch.prompt_mask, draws.sigmas).float()
        squared = (prediction - flow_target(batch.latents, draws.noise)) ** 2
        by_hand = sum(float((squared[i] * mask[i]).sum()) / squared[i].numel() for i in range(2)) / 2
        unmasked = float(squared.mean())
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    assert abs(by_hand - unmasked) > 1e-3 * unmasked


def test_black_regions_add_nothing_to_the_loss_or_its_gradients() -> None:
    prediction = torch.randn(1, 4, 8, 8, requires_grad=True)
    target, sigmas = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    for loss_type in ("l2", "huber", "smooth_l1"):
        prediction.grad = None
        loss = training_loss(
            prediction, target, sigmas, loss_type=loss_type, huber_c=0.1, huber_schedule="constant", mask=mask
        )
        loss.backward()
        assert prediction.grad is not None
        assert bool((prediction.grad[..., :4] == 0).all()), loss_type
        assert bool((prediction.grad[..., 4:] != 0).all()), loss_type


def test_an_all_black_mask_gives_the_adapter_no_gradient() -> None:
    batch = make_batch(3)
    batch.loss_mask = torch.zeros(2, 1, 8, 8)
    trainer = make_trainer(make_job(), FakeData(fixed=batch))
    result = trainer.step(TrainState())
    assert result.loss == 0.0
    grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
    assert grads and all(bool((grad == 0).all()) for grad in grads)


@pytest.mark.slow
def test_a_tiny_masked_run_ends_with_an_adapter(tmp_path: Path, tiny_model: Path) -> None:
    config = masked_job(tmp_path, tiny_model, max_train_steps=3, checkpoint_step_interval=2)
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "job", "run", "--config", str(config), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loss masks: 0 cached, 2 new" in result.stderr
    assert (workdir / "output" / "pytorch_lora_weights.safetensors").is_file()
