"""Fixtures shared across the suite."""

from pathlib import Path

import pytest

from job.tiny import write_tiny_job

# The real S3 (moto) and Hub-protocol servers, with fault injection: fixtures `s3`, `hub`, `moto_server`.
pytest_plugins = ["servers.fixtures"]

SEED_CONFIG = Path(__file__).parent / "fixtures" / "seed" / "config"


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default (model, data, config), built once; returns its config.json. Read-only."""
    return write_tiny_job(tmp_path_factory.mktemp("tiny"))
