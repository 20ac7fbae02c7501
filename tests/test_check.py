"""`lokr-job check` on the configs users bring."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SEED_CONFIG
from PIL import Image


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "job", "check", "--config", str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True)


def seed_config_on_tiny(
    tiny_job: Path, dest: Path, *, tiny_sizes: bool = True, data_dir: Path | None = None
) -> Path:
    """The seed's config set copied to ``dest``, its paths pointed at the tiny model and ``data_dir`` (the
    tiny job's 64-96 px images by default), and, with ``tiny_sizes``, its 1024 px sizes scaled to 64 px."""
    tiny_root = tiny_job.parent.parent
    data_dir = data_dir or tiny_root / "datasets" / "tiny-subject"
    shutil.copytree(SEED_CONFIG, dest / "config")
    config_path = dest / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config["data_backend_config"] = "config/multidatabackend.json"
    config["pretrained_model_name_or_path"] = str(tiny_root / "model")
    if tiny_sizes:
        config.update(resolution=64, validation_resolution="64x64")
    config_path.write_text(json.dumps(config, indent=4))
    backends_path = dest / "config" / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    for backend in backends:
        if "instance_data_dir" in backend:
            backend["instance_data_dir"] = str(data_dir)
            if tiny_sizes:
                backend.update(
                    resolution=64, minimum_image_size=64, maximum_image_size=64, target_downsample_size=64
                )
    backends_path.write_text(json.dumps(backends, indent=2))
    return config_path


def _photos_1024(folder: Path) -> Path:
    """A tiny dataset the seed's sizes accept: two 1024 px squares (its minimum_image_size is 1024)."""
    folder.mkdir(parents=True)
    for name, colour in (("a_red_square", (200, 30, 30)), ("a_blue_square", (30, 30, 200))):
        Image.new("RGB", (1024, 1024), colour).save(folder / f"{name}.png")
    return folder


def test_seed_config_pointed_at_the_tiny_model_and_data_passes_with_warnings_only(
    tiny_job: Path, tmp_path: Path
) -> None:
    photos = _photos_1024(tmp_path / "photos")
    result = _check(seed_config_on_tiny(tiny_job, tmp_path, tiny_sizes=False, data_dir=photos))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert warnings and all("ignored by lokr-job" in line for line in warnings)
    assert "ERROR" not in result.stderr


def test_the_tiny_job_config_passes_without_warnings(tiny_job: Path) -> None:
    result = _check(tiny_job)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
