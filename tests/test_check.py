"""`lokr-job check` on the configs users bring."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SEED_CONFIG


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "job", "check", "--config", str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True)


def test_seed_config_pointed_at_the_tiny_model_and_data_passes_with_warnings_only(
    tiny_job: Path, tmp_path: Path
) -> None:
    tiny_root = tiny_job.parent.parent
    shutil.copytree(SEED_CONFIG, tmp_path / "config")
    config_path = tmp_path / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config["data_backend_config"] = "config/multidatabackend.json"
    config["pretrained_model_name_or_path"] = str(tiny_root / "model")
    config_path.write_text(json.dumps(config, indent=4))
    backends_path = tmp_path / "config" / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    for backend in backends:
        if "instance_data_dir" in backend:
            backend["instance_data_dir"] = str(tiny_root / "datasets" / "tiny-subject")
    backends_path.write_text(json.dumps(backends, indent=2))

    result = _check(config_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert warnings and all("ignored by lokr-job" in line for line in warnings)
    assert "ERROR" not in result.stderr


def test_the_tiny_job_config_passes_without_warnings(tiny_job: Path) -> None:
    result = _check(tiny_job)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
