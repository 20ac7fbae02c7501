"""The model card: Hub front matter, settings, no secrets, and a python block that really runs."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from lokr_fixtures import write_random_adapter
from model_cards import card_render_settings, front_matter, run_python_block
from PIL import Image

from job.config.backends import DatasetConfig
from job.config.loader import ResolvedConfig, load_config
from job.infer import infer
from job.model.lokr import lycoris_settings
from job.publish.card import model_card

HF = "hf_plantedCARDtoken0123456789abcdef"
AWS_SECRET = "plantedCardAwsSecret0123456789"
IMAGES = [
    ("validation", "a red circle on blue", "images/step-24/validation.png"),
    ("photo", "a photo of sks, a 'red' circle: on blue", "images/step-24/photo.png"),
]


@pytest.fixture(scope="module")
def cfg(tiny_job: Path) -> ResolvedConfig:
    return load_config(tiny_job, ["hub_model_id=someone/tiny-lokr"])


@pytest.fixture(scope="module")
def adapter(cfg: ResolvedConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_adapter(
        Path(cfg.job.model_source),
        cfg.lycoris,
        tmp_path_factory.mktemp("adapter") / "pytorch_lora_weights.safetensors",
    )


def test_front_matter_for_the_hub(cfg: ResolvedConfig) -> None:
    card = model_card(cfg, base_model="terminusresearch/auraflow-v0.3", validation_images=IMAGES, step=24)
    meta = front_matter(card)
    assert meta["base_model"] == "terminusresearch/auraflow-v0.3"
    assert (meta["library_name"], meta["license"], meta["pipeline_tag"]) == (
        "diffusers",
        "apache-2.0",
        "text-to-image",
    )
    assert {"lycoris", "lokr", "auraflow", "text-to-image", "diffusers"} <= set(meta["tags"])
    assert [(w["text"], w["output"]["url"]) for w in meta["widget"]] == [(p, u) for _, p, u in IMAGES]
    assert meta["widget"][0]["parameters"]["negative_prompt"] == cfg.job.validation_negative_prompt
    assert "instance_prompt" not in meta  # the tiny job captions from text files


@pytest.mark.parametrize(
    ("base_model", "license_fields"),
    [
        ("fal/AuraFlow-v0.2", {"license": "apache-2.0"}),
        (
            "purplesmartai/pony-v7-base",
            {"license": "other", "license_link": "https://huggingface.co/purplesmartai/pony-v7-base"},
        ),
    ],
)
def test_license_follows_the_base_model(cfg: ResolvedConfig, base_model: str, license_fields: dict) -> None:
    meta = front_matter(model_card(cfg, base_model=base_model, validation_images=[], step=1))
    assert {k: meta.get(k) for k in license_fields} == license_fields


def test_a_local_base_model_is_not_claimed_as_a_hub_repo(cfg: ResolvedConfig) -> None:
    meta = front_matter(model_card(cfg, base_model=cfg.job.model_source, validation_images=[], step=1))
    assert "base_model" not in meta and meta["license"] == "other"


def test_trigger_settings_and_lycoris_config(cfg: ResolvedConfig) -> None:
    subject = DatasetConfig(
        id="subject", instance_data_dir="/d", caption_strategy="instanceprompt", instance_prompt="sks shape"
    )
    with_subject = dataclasses.replace(cfg, datasets=[subject])
    card = model_card(with_subject, base_model="fal/AuraFlow-v0.2", validation_images=IMAGES, step=24)
    assert front_matter(card)["instance_prompt"] == "sks shape"
    assert "`sks shape`" in card
    for row in ("| Steps | 24 (24 planned) |", "| Learning rate | 0.001 |", "| Optimizer | adamw |"):
        assert row in card
    assert "| Mixed precision | no |" in card and "| Resolution | 64 (pixel_area) |" in card
    assert "| LR scheduler | constant |" in card and "| Batch size | 1 x 1 accumulation" in card
    (lycoris_json,) = re.findall(r"```json\n(.*?)```", card, re.DOTALL)
    assert json.loads(lycoris_json) == lycoris_settings(cfg.lycoris)
    assert "![photo](images/step-24/photo.png)" in card


def test_no_secrets_in_the_card(tiny_job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    cfg = load_config(
        tiny_job,
        [
            f"validation_prompt=a photo {HF}",
            f"tracker_run_name={AWS_SECRET}",
            "webhook_url=https://discord.example/api/webhooks/1/WEBHOOKSECRET",
        ],
    )
    card = model_card(
        cfg, base_model="fal/AuraFlow-v0.2", validation_images=[("v", f"x {HF}", "i.png")], step=1
    )
    for secret in (HF, AWS_SECRET, "WEBHOOKSECRET"):
        assert secret not in card


def test_the_python_block_runs_against_local_files(
    cfg: ResolvedConfig, adapter: Path, tmp_path: Path
) -> None:
    card = model_card(cfg, base_model="terminusresearch/auraflow-v0.3", validation_images=IMAGES, step=24)
    model = Path(cfg.job.model_source)
    constants = {"BASE_MODEL": str(model), "ADAPTER_FILE": str(adapter)}
    produced = run_python_block(card, constants, tmp_path / "run")

    # The same image as lokr-job infer gives with the card's settings, and not the base model's.
    settings = card_render_settings(cfg)
    prompts = [cfg.job.validation_prompt]
    (expected,) = infer(model, adapter, prompts, tmp_path / "infer", **settings)
    (base,) = infer(model, None, prompts, tmp_path / "base", **settings)
    assert np.array_equal(produced, np.asarray(Image.open(expected)))
    assert not np.array_equal(produced, np.asarray(Image.open(base)))
