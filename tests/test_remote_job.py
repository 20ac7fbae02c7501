"""The whole tiny job as a container runs it: every input on S3 (or the Hub), the adapter pushed to the Hub.

The CLI runs in a subprocess against the test servers (environment: ``AWS_ENDPOINT_URL`` and fake keys from
the ``s3`` fixture, ``HF_ENDPOINT``/``HF_TOKEN``/``HF_HUB_DISABLE_XET`` from the ``hub`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from remote_trees import put_tree_hub, put_tree_s3

from job.errors import ExitCode

pytestmark = pytest.mark.slow
ADAPTER = "pytorch_lora_weights.safetensors"


def _run_job(config_uri: str, workdir: Path, hub_repo: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "job", "run", "--config", config_uri, "--workdir", str(workdir)]
    argv += ["--set", "push_to_hub=true", "--set", f"hub_model_id={hub_repo}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    return result


def test_every_input_on_s3_and_the_adapter_on_the_hub_even_with_faults(
    s3, hub, tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_tree_s3(s3, tiny_job.parent.parent, "jobs/tiny")
    config = s3.uri("jobs/tiny/config/config.json")

    _run_job(config, tmp_path / "clean", "someone/tiny-lokr")
    adapter = hub.files("someone/tiny-lokr")[ADAPTER]
    assert adapter == (tmp_path / "clean" / "output" / ADAPTER).read_bytes()

    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "12")
    s3.faults.configure(rate=0.3, seed=11)
    hub.faults.configure(rate=0.3, seed=12)
    _run_job(config, tmp_path / "faulty", "someone/tiny-lokr-faulty")
    assert s3.log.faults() and hub.log.faults()
    assert hub.files("someone/tiny-lokr-faulty")[ADAPTER] == adapter


def test_config_and_data_on_the_hub(hub, tiny_job: Path, tmp_path: Path) -> None:
    put_tree_hub(hub, "someone/jobs", tiny_job.parent.parent, "tiny", repo_type="dataset")
    _run_job("hf://datasets/someone/jobs/tiny/config/config.json", tmp_path / "work", "someone/tiny-lokr")
    files = hub.files("someone/tiny-lokr")
    assert files[ADAPTER] == (tmp_path / "work" / "output" / ADAPTER).read_bytes()
    assert {"lycoris_config.json", "README.md"} <= set(files)
