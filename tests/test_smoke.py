"""``scripts/smoke.sh``, the CI smoke test, runs here as CI runs it (``make test`` includes this file)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMOKE = Path(__file__).parents[1] / "scripts" / "smoke.sh"


def test_smoke_script_trains_loads_and_renders_the_tiny_job(tmp_path: Path) -> None:
    # The venv first on PATH: the script and the entrypoint call `lokr-job` and `python3` by name.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", str(SMOKE), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "entrypoint: exec: lokr-job run" in result.stderr
    assert "smoke: adapter loads: 16 LoKr modules" in result.stdout
    assert "smoke: OK: 3 image(s)" in result.stderr
    assert (tmp_path / "work" / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "infer").glob("*.png"))
