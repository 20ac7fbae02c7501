"""Scanning a folder: recursive discovery, every bad-data case skipped with its reason, probes remembered."""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from test_cache_support import noise_image, write_image

from job.config.backends import DatasetConfig
from job.data.discovery import find_images
from job.data.geometry import ModelGeometry
from job.data.scan import scan_dataset

GEOMETRY = ModelGeometry(alignment=16, max_patches=1024)


def _dataset(root: Path, **settings: object) -> DatasetConfig:
    base = {
        "id": "d",
        "instance_data_dir": str(root),
        "resolution": 32,
        "resolution_type": "pixel_area",
        "minimum_image_size": 16,
        "caption_strategy": "textfile",
    }
    return DatasetConfig(**{**base, **settings})


def _scan(root: Path, probe_path: Path, **settings: object):
    return scan_dataset(
        _dataset(root, **settings), root, GEOMETRY, seed=0, aspect_rounding=None, probe_path=probe_path
    )


def _captioned(path: Path, caption: str = "a caption") -> Path:
    path.with_suffix(".txt").write_text(caption)
    return path


def test_discovery_is_recursive_filters_extensions_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["a.png", "sub/b.JPG", "sub/deeper/c.jpeg", "d.webp", "e.bmp", "notes.txt", ".hidden.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "f.png").write_bytes(b"x")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    names = [found.relpath for found in find_images(tmp_path)]
    assert names[:5] == ["a.png", "d.webp", "e.bmp", "sub/b.JPG", "sub/deeper/c.jpeg"]
    assert len(names) == 5  # the symlink back to the root is not walked twice


def test_every_bad_data_case_is_handled(tmp_path: Path) -> None:
    root = tmp_path / "data"
    good = _captioned(write_image(root / "good.png", (40, 40), seed=1))
    (root / "zero.png").write_bytes(b"")
    _captioned(root / "zero.png")
    (root / "text.jpg").write_text("not an image")
    _captioned(root / "text.jpg")
    truncated = io.BytesIO()
    noise_image((64, 64), 2).save(truncated, format="JPEG")
    _captioned(root / "truncated.jpg").write_bytes(truncated.getvalue()[:300])
    _captioned(write_image(root / "tiny.png", (8, 8), seed=3))
    write_image(root / "uncaptioned.png", seed=4)
    _captioned(write_image(root / "empty_caption.png", seed=5), "   \n")
    cmyk = _captioned(root / "cmyk.jpg")
    noise_image((32, 32), 6).convert("CMYK").save(cmyk)
    sixteen = _captioned(root / "sixteen.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(sixteen)
    alpha = _captioned(root / "alpha.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(alpha)
    rotated = _captioned(root / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image((64, 32), 7).save(rotated, exif=exif)

    result = _scan(root, tmp_path / "probes.json")

    reasons = {s.relpath: s.reason for s in result.skipped}
    assert set(reasons) == {
        "zero.png",
        "text.jpg",
        "truncated.jpg",
        "tiny.png",
        "uncaptioned.png",
        "empty_caption.png",
    }
    assert reasons["zero.png"].startswith("empty file")
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["tiny.png"].startswith("too small: 8x8")
    assert reasons["uncaptioned.png"].startswith("missing caption file: uncaptioned.txt")
    assert reasons["empty_caption.png"].startswith("empty caption file")
    used = {s.relpath: s for s in result.samples}
    assert set(used) == {good.name, "cmyk.jpg", "sixteen.png", "alpha.png", "rotated.jpg"}
    assert used["rotated.jpg"].transform.bucket[1] > used["rotated.jpg"].transform.bucket[0]  # portrait now
    assert result.images_found == 11


def test_unchanged_files_are_not_read_again(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for index in range(5):
        _captioned(write_image(root / f"{index}.png", seed=index))
    (root / "bad.png").write_bytes(b"")
    probes = tmp_path / "probes.json"
    assert _scan(root, probes).probed == 6
    again = _scan(root, probes)
    assert again.probed == 0 and len(again.samples) == 5 and len(again.skipped) == 1
    write_image(root / "3.png", seed=99)
    os.utime(root / "3.png", ns=(1, 1))
    changed = _scan(root, probes)
    assert changed.probed == 1
    assert {s.relpath: s.sha256 for s in changed.samples}["3.png"] != {
        s.relpath: s.sha256 for s in again.samples
    }["3.png"]


def test_captions_are_read_on_every_scan(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _captioned(write_image(root / "a.png"), "before")
    probes = tmp_path / "probes.json"
    assert _scan(root, probes).samples[0].captions == ("before",)
    (root / "a.txt").write_text("after")
    assert _scan(root, probes).samples[0].captions == ("after",)


def test_filename_and_instance_prompt_strategies(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image(root / "a_red_cat.png")
    probes = tmp_path / "probes.json"
    assert _scan(root, probes, caption_strategy="filename").samples[0].captions == ("a red cat",)
    by_prompt = _scan(root, probes, caption_strategy="instanceprompt", instance_prompt="sks")
    assert by_prompt.samples[0].captions == ("sks",)
