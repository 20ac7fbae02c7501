"""Helpers shared by the data and cache tests (no tests here): generated images, a job config around
them, and a private copy of the tiny model.

Imported by module name (pytest puts ``tests/`` on ``sys.path``); fixtures imported from here are
registered in the importing module.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from job.config.loader import load_config
from job.context import JobContext
from job.workdir import WorkDir

LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16}


def noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A random image (distinct seeds give distinct bytes, so distinct content keys)."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_image(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0, **save: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, seed).save(path, **save)
    return path


def write_job(root: Path, model: Path, datasets: list[dict[str, Any]], **job: Any) -> Path:
    """config.json, multidatabackend.json and lycoris_config.json under ``root/config``; returns config.json."""
    config_dir = root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    backends = [*datasets, {"id": "text-embeds", "dataset_type": "text_embeds", "cache_dir": "cache/text"}]
    (config_dir / "multidatabackend.json").write_text(json.dumps(backends))
    (config_dir / "lycoris_config.json").write_text(json.dumps(LYCORIS))
    settings = {
        "pretrained_model_name_or_path": str(model),
        "lycoris_config": "lycoris_config.json",
        "data_backend_config": "multidatabackend.json",
        "max_train_steps": 10,
        "resolution": 32,
        "resolution_type": "pixel_area",
        # 32 px images: SimpleTuner's 64 px alignment would make every bucket one 64x64 square.
        "aspect_bucket_alignment": 16,
        "tokenizer_max_length": 16,
        "vae_batch_size": 16,
        "seed": 7,
        **job,
    }
    path = config_dir / "config.json"
    path.write_text(json.dumps(settings))
    return path


def open_job(config: Path, workdir: Path, overrides: list[str] | None = None) -> JobContext:
    return JobContext(load_config(config, overrides), WorkDir(workdir))


def dataset(dataset_id: str, folder: Path, **settings: Any) -> dict[str, Any]:
    return {"id": dataset_id, "type": "local", "instance_data_dir": str(folder), **settings}


@pytest.fixture(scope="session")
def built_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from job.model.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    build_tiny_pipeline(folder)
    return folder


@pytest.fixture
def tiny_model(built_tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny AuraFlow folder: a test may change or delete parts of it."""
    return Path(shutil.copytree(built_tiny_model, tmp_path / "model"))
