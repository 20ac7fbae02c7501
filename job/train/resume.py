"""Where training continues from: the checkpoint ``resume_from_checkpoint`` names, loaded by the trainer's
``TrainingCheckpoint``; with ``latest``, checkpoints that fail to load are set aside (here and at the run URI) and the
one before is tried. Both trainers (``job.train.lokr``, ``job.train.full``) resume through here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from job import distributed
from job.config.schema import JobConfig
from job.distributed import any_rank, require_same
from job.errors import ConfigError, JobError, TransientError
from job.train.checkpoint import checkpoint_step, latest_complete, resolve_resume, set_aside
from job.train.checkpointer import Checkpointer
from job.train.remote import download_newer_checkpoint, set_aside_remote
from job.train.state import TrainingCheckpoint, TrainState

log = logging.getLogger("lokr")


def resume_and_checkpoint(
    checkpoint: TrainingCheckpoint, root: Path, job: JobConfig, *, run_uri: str | None, total: int
) -> tuple[TrainState, Checkpointer]:
    """Both trainers' start: the position to train from (``resume_state``, else step 0) and the
    ``Checkpointer`` that saves into ``root``, knowing the step it resumed at is saved already."""
    resumed = resume_state(checkpoint, root, job.resume_from_checkpoint, run_uri=run_uri, total=total)
    checkpointer = Checkpointer(
        root,
        checkpoint,
        total_limit=job.checkpoints_total_limit,
        last_saved_step=resumed.step if resumed is not None else None,
    )
    return resumed or TrainState(), checkpointer


def resume_state(
    checkpoint: TrainingCheckpoint, root: Path, setting: str | None, *, run_uri: str | None, total: int
) -> TrainState | None:
    """Restore the checkpoint under ``root`` that ``setting`` (``resume_from_checkpoint``) names; its
    position, or None when training starts fresh. Every process resumes from the same checkpoint.

    With ``latest``, a complete checkpoint whose contents fail to load (``load`` raises anything but a
    ``JobError``, which means this config cannot continue it) is set aside, here and at ``run_uri``, and
    the one before is tried. When a failed load may have changed the objects (``load_is_atomic`` false:
    DeepSpeed's ``load_state``) and nothing loads, the process exits 75 to start fresh on clean ones.
    """
    load = checkpoint.load
    if setting != "latest":
        resume = resolve_resume(root, setting)
        require_same(resume.name if resume is not None else None, "the checkpoint to resume from")
        if resume is None:
            return None
        problem, state = _try_load(resume, load)
        if state is None:
            raise ConfigError(
                f"resume_from_checkpoint: {resume} cannot be loaded: {problem}; use 'latest' to take the "
                "newest one that loads, or 'none' to start over"
            )
        return _resumed(resume, state, total)
    failed: list[str] = []
    while (resume := _latest(root)) is not None:
        problem, state = _try_load(resume, load)
        if state is not None:
            return _resumed(resume, state, total)
        failed.append(resume.name)
        _set_aside(resume, problem, run_uri)
    if failed and not checkpoint.model.load_is_atomic:
        raise TransientError(
            f"no checkpoint loads ({', '.join(failed)} set aside) and the failed loads may have changed the "
            "model: run again to start from step 0"
        )
    if failed:
        log.error(
            "NO CHECKPOINT LOADS: %s set aside as unloadable; training starts again from step 0",
            ", ".join(failed),
        )
    return None


def _latest(root: Path) -> Path | None:
    latest = latest_complete(root)
    require_same(latest.name if latest is not None else None, "the checkpoint to resume from")
    return latest


def _try_load(folder: Path, load: Callable[[Path], TrainState]) -> tuple[str, TrainState | None]:
    """``load(folder)``, or why it failed on any process (every process learns the same outcome)."""
    problem, state = "", None
    try:
        state = load(folder)
    except JobError:
        raise  # this config cannot continue the checkpoint: the user decides, nothing is set aside
    except Exception as exc:
        log.debug("loading %s failed", folder, exc_info=True)
        problem = f"{type(exc).__name__}: {exc}"
    if any_rank(lambda: state is None)():
        return problem or "it failed to load on another process", None
    return "", state


def _set_aside(folder: Path, problem: str, run_uri: str | None) -> None:
    """Move ``folder`` aside on this machine and, when it came from the run URI, there too; then fetch the
    run URI's next newest checkpoint if it is newer than what is left here."""
    moved: Path | None = None

    def locally() -> None:
        nonlocal moved
        moved = set_aside(folder, problem)

    distributed.once_per_machine(locally)
    if not run_uri:
        return
    step = checkpoint_step(folder)

    def remotely() -> None:
        if moved is not None and step is not None:  # None: another machine sharing the folder moved it
            set_aside_remote(run_uri, moved, step)

    distributed.once(remotely)
    distributed.once_per_machine(lambda: download_newer_checkpoint(run_uri, folder.parent))


def _resumed(folder: Path, state: TrainState, total: int) -> TrainState:
    if state.step > total:
        raise ConfigError(
            f"resume_from_checkpoint: {folder.name} is at step {state.step}, past max_train_steps {total}; "
            "raise max_train_steps or resume from an earlier checkpoint"
        )
    log.info(
        "resumed from %s (step %d, epoch %d, batch %d)", folder, state.step, state.epoch, state.batch_index
    )
    return state
