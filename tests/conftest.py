"""Fixtures shared across the suite."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from job.model.lokr import reset_lycoris_preset
from job.tiny import write_tiny_job

# The real S3 (moto) and Hub-protocol servers, with fault injection: fixtures `s3`, `hub`, `moto_server`.
pytest_plugins = ["servers.fixtures"]

SEED_CONFIG = Path(__file__).parent / "fixtures" / "seed" / "config"


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default (model, data, config), built once; returns its config.json. Read-only."""
    return write_tiny_job(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fresh_lycoris_preset() -> Iterator[None]:
    """LyCORIS keeps the last applied preset process-wide: put its default back after each test."""
    yield
    reset_lycoris_preset()


@pytest.fixture
def fresh_accelerate_state() -> None:
    """accelerate keeps one state per process: a test that runs the job in this process must not inherit
    another test's (its mixed precision, its device), whichever test the worker ran before."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny ops gain nothing from threads, and OpenMP workers spinning on a busy 2-core machine made each
    training step of the tiny model ~100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PicklePayload:
    """What someone who can write to a run URI could plant in a checkpoint: unpickling it runs a command
    that creates ``proof``."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


@pytest.fixture
def pickle_payload(tmp_path: Path) -> PicklePayload:
    return PicklePayload(tmp_path / "payload-ran")
