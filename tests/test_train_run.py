"""``train_adapter`` in process on the warmed tiny job: stop and resume, checkpoint hooks, guard rails."""

import shutil
from pathlib import Path

import pytest

from job.context import JobContext, open_context
from job.errors import ConfigError, TransientError
from job.train.checkpoint import list_checkpoints
from job.train.output import ADAPTER_FILE, is_finished
from job.train.run import train_adapter

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def workdir(tiny_job: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from job.cache.warm import warm_caches

    path = tmp_path_factory.mktemp("train-run")
    warm_caches(_context(tiny_job, path))
    return path


def _context(config: Path, workdir: Path, *overrides: str) -> JobContext:
    return open_context(str(config), workdir, None, ["checkpoint_step_interval=2", *overrides])


def test_stop_hooks_resume_and_guard_rails(tiny_job: Path, workdir: Path):
    ctx = _context(tiny_job, workdir, "max_train_steps=4")
    hooked: list[tuple[str, int]] = []
    answers = iter([False, False, False, True])
    with pytest.raises(TransientError, match="stopped early at step 3"):
        train_adapter(
            ctx,
            should_stop=lambda: next(answers),
            checkpoint_hooks=[lambda path, step: hooked.append((path.name, step))],
        )
    assert hooked == [("checkpoint-00000002", 2), ("checkpoint-00000003", 3)]
    assert not (workdir / "output" / ADAPTER_FILE).exists()

    path = train_adapter(ctx)
    assert path == workdir / "output" / ADAPTER_FILE
    assert is_finished(workdir / "output", config_hash=ctx.config.hash, step=4)
    assert [step for step, _ in list_checkpoints(workdir / "checkpoints")] == [3, 4]

    with pytest.raises(ConfigError, match="past max_train_steps 2"):
        train_adapter(_context(tiny_job, workdir, "max_train_steps=2"))
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        train_adapter(
            _context(tiny_job, workdir, "max_train_steps=6", "resume_from_checkpoint=checkpoint-12")
        )


def test_an_int8_torchao_run_ends_with_an_adapter_and_resumes_to_the_same_bytes(
    tiny_job: Path, workdir: Path, tmp_path: Path
):
    """The caches are the module's warmed ones; each run trains into a work directory of its own."""
    runs = {}
    for name in ("straight", "resumed"):
        folder = tmp_path / name
        shutil.copytree(workdir / "cache", folder / "cache")
        runs[name] = _context(tiny_job, folder, "max_train_steps=4", "base_model_precision=int8-torchao")
    train_adapter(runs["straight"])
    answers = iter([False, False, True])
    with pytest.raises(TransientError, match="stopped early at step 2"):
        train_adapter(runs["resumed"], should_stop=lambda: next(answers))
    train_adapter(runs["resumed"])
    straight = (tmp_path / "straight" / "output" / ADAPTER_FILE).read_bytes()
    assert (tmp_path / "resumed" / "output" / ADAPTER_FILE).read_bytes() == straight
