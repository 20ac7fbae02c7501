"""The embedded default job: a tiny model, a tiny synthetic dataset and a SimpleTuner-format config set.

``write_tiny_job(dest)`` lays out what a SimpleTuner user would have (``config/``, ``datasets/``, the model)
so the whole job runs end to end on a CPU in seconds with no download. Every byte is deterministic, so two
builds compare equal and content-addressed caches stay valid across machines.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SEED = 1234
DATASET_ID = "tiny-subject"
IMAGE_SIZES = ((64, 64), (80, 64), (64, 80), (96, 96))  # (width, height): square and both aspect buckets

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "yellow": (235, 210, 50),
    "orange": (240, 140, 30),
    "purple": (130, 60, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (240, 150, 190),
    "gray": (128, 128, 128),
}

# (shape, colour, background): fixed so file names and captions are stable and unique.
SCENES: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "blue"),
    ("square", "yellow", "black"),
    ("triangle", "green", "white"),
    ("circle", "white", "purple"),
    ("square", "red", "gray"),
    ("triangle", "orange", "blue"),
    ("ring", "blue", "yellow"),
    ("cross", "black", "pink"),
    ("circle", "pink", "green"),
    ("square", "purple", "orange"),
    ("triangle", "white", "red"),
    ("ring", "green", "black"),
)

# The seed's lycoris_config.json, byte for byte, trailing commas included: users paste it as is.
LYCORIS_CONFIG_TEXT = """{
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": [
            "Attention",
        ],
        "module_algo_map": {
            "Attention": {
                "factor": 8
            },
        }
    }
}
"""

VALIDATION_PROMPT = "a red circle on blue"

JOB_CONFIG: dict[str, Any] = {
    "model_family": "auraflow",
    "model_type": "lora",
    "lora_type": "lycoris",
    "pretrained_model_name_or_path": "model",
    "lycoris_config": "config/lycoris_config.json",
    "data_backend_config": "config/multidatabackend.json",
    "base_model_precision": "no_change",
    "mixed_precision": "no",
    "optimizer": "adamw",
    "learning_rate": "1e-3",
    "lr_scheduler": "constant",
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 24,
    "checkpoint_step_interval": 8,
    "checkpoints_total_limit": 2,
    "resume_from_checkpoint": "latest",
    "seed": 42,
    "resolution": 64,
    "resolution_type": "pixel_area",
    # At 64 px SimpleTuner's 64 px alignment makes every bucket square; 16 px keeps the aspect buckets.
    "aspect_bucket_alignment": 16,
    "validation_resolution": "64x64",
    "validation_num_inference_steps": "2",
    # Far past max_train_steps: validation stays off unless asked for.
    "validation_step_interval": 1000,
    "validation_seed": 42,
    "validation_prompt": VALIDATION_PROMPT,
    "--user_prompt_library": "config/user_prompt_library.json",
    "report_to": "none",
    "gradient_checkpointing": "false",
    "max_grad_norm": 1.0,
    "grad_clip_method": "norm",
    "caption_dropout_probability": 0.0,
}

DATA_BACKENDS: list[dict[str, Any]] = [
    {
        "id": DATASET_ID,
        "type": "local",
        "instance_data_dir": f"datasets/{DATASET_ID}",
        "caption_strategy": "textfile",
        "crop": False,
        "resolution": 64,
        "resolution_type": "pixel_area",
        "minimum_image_size": 32,
        "cache_dir_vae": f"cache/vae/auraflow/{DATASET_ID}",
        # 12 images x (1 + 2 repeats) = 36 samples an epoch, more than max_train_steps.
        "repeats": 2,
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/auraflow",
        "write_batch_size": 128,
    },
]

PROMPT_LIBRARY: dict[str, str] = {
    "photo_<token>": "a photo of <token>, a red circle on blue",
    "drawing_<token>": "a simple drawing of <token> in the center of a white background",
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: tuple[int, int]

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} on {self.background}"

    @property
    def stem(self) -> str:
        return self.caption.replace(" ", "_")


def scenes() -> list[Scene]:
    """The dataset's images, in order; sizes cycle so every aspect bucket gets several images."""
    return [
        Scene(shape, colour, background, IMAGE_SIZES[i % len(IMAGE_SIZES)])
        for i, (shape, colour, background) in enumerate(SCENES)
    ]


def captions() -> list[str]:
    return [scene.caption for scene in scenes()]


def write_tiny_job(dest: Path) -> Path:
    """Write the embedded default job under ``dest`` and return the path of its ``config/config.json``.

    Only ``model/``, ``datasets/tiny-subject/`` and the four config files are replaced; anything else under
    ``dest`` is left alone.
    """
    from job.model.tiny import build_tiny_pipeline

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(dest / "model")
    write_dataset(dest / "datasets" / DATASET_ID)
    return write_config(dest / "config")


def write_config(config_dir: Path) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_dir / "multidatabackend.json", DATA_BACKENDS, indent=2)
    _write_json(config_dir / "user_prompt_library.json", PROMPT_LIBRARY, indent=4)
    (config_dir / "lycoris_config.json").write_bytes(LYCORIS_CONFIG_TEXT.encode("utf-8"))
    config_path = config_dir / "config.json"
    _write_json(config_path, JOB_CONFIG, indent=4)
    return config_path


def write_dataset(dataset_dir: Path) -> None:
    # Start from empty so images from an older build never linger in the dataset.
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    dataset_dir.mkdir(parents=True)
    for index, scene in enumerate(scenes()):
        image = draw_scene(scene, index)
        # No metadata chunks, fixed compression: the PNG bytes depend only on the pixels.
        image.save(dataset_dir / f"{scene.stem}.png", format="PNG", compress_level=6, optimize=False)
        (dataset_dir / f"{scene.stem}.txt").write_bytes(f"{scene.caption}\n".encode())


def draw_scene(scene: Scene, index: int) -> Image.Image:
    """A flat background with mild seeded noise and one shape at a seeded place and size."""
    rng = np.random.default_rng([SEED, index])
    width, height = scene.size
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[:] = COLOURS[scene.background]
    # Some texture, so latents and gradients are not degenerate on perfectly flat colour.
    pixels += rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    side = int(rng.integers(min(width, height) // 3, min(width, height) * 2 // 3))
    left = int(rng.integers(0, width - side))
    top = int(rng.integers(0, height - side))
    _draw_shape(
        ImageDraw.Draw(image), scene.shape, (left, top, left + side, top + side), COLOURS[scene.colour]
    )
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    left, top, right, bottom = box
    side = right - left
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + side // 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, side // 6))
    elif shape == "cross":
        bar = max(2, side // 4)
        mid_x, mid_y = left + side // 2, top + side // 2
        draw.rectangle((mid_x - bar // 2, top, mid_x + bar // 2, bottom), fill=fill)
        draw.rectangle((left, mid_y - bar // 2, right, mid_y + bar // 2), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _write_json(path: Path, data: Any, indent: int) -> None:
    path.write_bytes((json.dumps(data, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))
