"""What a run shows while it trains: validation images, CLIP scores, TensorBoard events, webhook events,
no secrets.

One real ``lokr-job run`` of the tiny job in a subprocess, with a real HTTP webhook receiver, a tiny CLIP
model as the evaluation model, planted secrets in its environment, and TensorBoard event files read back
with TensorBoard's own reader.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from clip_fixtures import write_tiny_clip, write_tiny_tae
from servers.webhook import WebhookReceiver

SECRETS = {
    "HF_TOKEN": "hf_plantedSecretToken0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "plantedAwsSecretKey/0123456789abcdefABCDEF",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdefplanted1",
}


@pytest.fixture(scope="module")
def observed_run(
    tiny_job: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, WebhookReceiver, str]:
    workdir = tmp_path_factory.mktemp("observed")
    clip = write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
    tae = write_tiny_tae(tmp_path_factory.mktemp("tae") / "tiny-tae")
    with WebhookReceiver() as receiver:
        overrides = [
            "max_train_steps=4",
            "checkpoint_step_interval=2",
            "validation_step_interval=2",
            "eval_steps_interval=2",
            "num_eval_images=2",
            "report_to=tensorboard",
            f"webhook_url={receiver.url}",
            "evaluation_type=clip",
            f"pretrained_evaluation_model_name_or_path={clip}",
            "validation_preview=true",
            "validation_num_inference_steps=3",
            f"validation_preview_model={tae}",
        ]
        command = [sys.executable, "-m", "job", "run", "--config", str(tiny_job), "--workdir", str(workdir)]
        command += [arg for override in overrides for arg in ("--set", override)]
        env = {**os.environ, **SECRETS, "LOKR_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, receiver, result.stdout + result.stderr


def test_validation_images_land_per_step(observed_run: tuple[Path, WebhookReceiver, str]) -> None:
    workdir, _, _ = observed_run
    validation = workdir / "output" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["step-2", "step-4"]
    for step in ("step-2", "step-4"):
        assert sorted(p.name for p in (validation / step).iterdir()) == [
            "drawing.png",
            "photo.png",
            "validation.png",
        ]


def test_tensorboard_holds_losses_and_images(observed_run: tuple[Path, WebhookReceiver, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _, _ = observed_run
    events = EventAccumulator(str(workdir / "output" / "logs"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "s_per_step", "eval_loss"):
        assert tag in scalars, scalars
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
    assert {e.step for e in events.Images("validation/validation")} == {2, 4}


def test_every_validation_is_clip_scored_in_the_trackers_the_webhook_and_the_log(
    observed_run: tuple[Path, WebhookReceiver, str],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, receiver, logs = observed_run
    events = EventAccumulator(str(workdir / "output" / "logs")).Reload()
    for tag in ("clip/mean", "clip/min", "clip/max", "clip/std"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4], tag
    for step in (2, 4):
        (mean,) = [e.value for e in events.Scalars("clip/mean") if e.step == step]
        (low,) = [e.value for e in events.Scalars("clip/min") if e.step == step]
        (high,) = [e.value for e in events.Scalars("clip/max") if e.step == step]
        assert 0 <= low <= mean <= high <= 100
    validations = [body for body in receiver.bodies if body.get("event") == "validation"]
    assert [body["step"] for body in validations] == [2, 4]
    assert all(set(body["clip"]) == {"clip/mean", "clip/min", "clip/max", "clip/std"} for body in validations)
    assert logs.count("evaluation: CLIP score at step") == 2


def test_validation_previews_reach_the_webhook_while_sampling(
    observed_run: tuple[Path, WebhookReceiver, str],
) -> None:
    """Three sampling steps, a preview every step: steps 1 and 2 of each image, before its validation."""
    import base64
    import io

    from PIL import Image

    _, receiver, _ = observed_run
    previews = [body for body in receiver.bodies if body["event"] == "validation_preview"]
    images = ("validation", "photo", "drawing")
    expected = [(step, image, n) for step in (2, 4) for image in images for n in (1, 2)]
    assert sorted((b["step"], b["image"], b["sampling_step"]) for b in previews) == sorted(expected)
    assert all(body["sampling_steps"] == 3 for body in previews)
    for body in previews:
        picture = Image.open(io.BytesIO(base64.b64decode(body["png_base64"])))
        assert picture.format == "PNG" and picture.size == (64, 64)  # the validation resolution
        assert "png_base64" not in body["content"]  # the one-line summary leaves the image out
    order = receiver.events
    first_validation = order.index("validation")
    assert order[1:first_validation] == ["validation_preview"] * 6  # as they come, before the images


def test_the_webhook_hears_every_event(observed_run: tuple[Path, WebhookReceiver, str]) -> None:
    _, receiver, _ = observed_run
    # Validation runs in the step's observer call, before that step's checkpoint is saved.
    events = [event for event in receiver.events if event != "validation_preview"]
    assert events == ["start", "validation", "checkpoint", "validation", "checkpoint", "finish"]
    start = receiver.bodies[0]
    assert start["total_steps"] == 4 and "lokr-job" in start["content"]


def test_planted_secrets_appear_nowhere(observed_run: tuple[Path, WebhookReceiver, str]) -> None:
    """Not in the logs, status.json, checkpoints' JSON, TensorBoard's config text, nor webhook bodies."""
    workdir, receiver, logs = observed_run
    written = [logs]
    for path in workdir.rglob("*"):
        readable = path.suffix in {".json", ".md", ".txt", ".yaml"} or "tfevents" in path.name
        if path.is_file() and readable:
            written.append(path.read_bytes().decode("utf-8", errors="replace"))
    for name, secret in SECRETS.items():
        assert not any(secret in text for text in [*written, *(raw.decode() for raw in receiver.raw)]), name
    # The webhook URL's path is its secret (Discord, Slack): never logged nor tracked.
    assert not any(receiver.path in text for text in written)


def test_cached_prompt_embeddings_render_what_the_text_encoder_would(
    observed_run: tuple[Path, WebhookReceiver, str], tiny_job: Path, tmp_path: Path
) -> None:
    import numpy as np
    import torch
    from diffusers import AuraFlowTransformer2DModel
    from PIL import Image

    from job.cache.dataset import TrainingData
    from job.context import open_context
    from job.validate.prompts import validation_prompts
    from job.validate.render import build_validation_pipeline, render_validation

    workdir, _, _ = observed_run
    ctx = open_context(str(tiny_job), workdir, None, ["max_train_steps=4"])
    data = TrainingData.open(ctx.config, ctx.workdir)
    model = ctx.config.job.model_source
    transformer = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
    prompts = validation_prompts(ctx.config)
    with_encoder = build_validation_pipeline(model, transformer, torch.float32, "cpu")
    without = build_validation_pipeline(model, transformer, torch.float32, "cpu", with_text_encoder=False)
    assert without.text_encoder is None
    encoded = render_validation(with_encoder, prompts, ctx.config.job, 1, tmp_path / "encoded")
    cached = render_validation(
        without, prompts, ctx.config.job, 1, tmp_path / "cached", embeddings=data.sample_embedding
    )
    for a, b in zip(encoded, cached, strict=True):
        difference = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert difference.max() <= 1, a.name
    # vae_enable_slicing decodes one image at a time: the same pictures.
    sliced = build_validation_pipeline(
        model, transformer, torch.float32, "cpu", with_text_encoder=False, vae_slicing=True
    )
    assert sliced.vae.use_slicing and not sliced.vae.use_tiling
    slices = render_validation(
        sliced, prompts, ctx.config.job, 1, tmp_path / "sliced", embeddings=data.sample_embedding
    )
    for a, b in zip(cached, slices, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


@pytest.mark.parametrize(
    ("key", "switch", "expected"),
    [
        (
            "pretrained_evaluation_model_name_or_path",
            "evaluation_type=clip",
            "no transformers CLIP model there",
        ),
        ("validation_preview_model", "validation_preview=true", "no diffusers AutoencoderTiny there"),
    ],
)
def test_a_helper_model_that_is_not_there_stops_the_run_before_training(
    tiny_job: Path, tmp_path: Path, key: str, switch: str, expected: str
) -> None:
    missing = tmp_path / "not-here"
    settings = [switch, f"{key}={missing}", "webhook_url=http://127.0.0.1:9/hook"]
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    run = ["run", "--config", str(tiny_job), "--workdir", str(tmp_path / "w"), *overrides]
    command = [sys.executable, "-m", "job", *run]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{key} '{missing}': {expected}" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
