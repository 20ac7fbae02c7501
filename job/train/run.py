"""The ``train`` stage: wire data, model, LoKr, optimizer, schedule, EMA and checkpoints into the loop.

``model_type: lora`` trains a LoKr adapter (``build_trainer``); ``model_type: full`` every weight, with
DeepSpeed (``job.train.full``). Idempotent: when ``output/`` already holds this config's weights at the
final step, nothing is loaded. ``build_trainer`` is the LoKr set-up on its own (the benchmark times the
very loop ``lokr-job train`` runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from job.context import JobContext
from job.errors import ConfigError, JobError, TransientError
from job.train.checkpointer import CheckpointHook
from job.train.state import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from job.model.offload import GroupOffload
    from job.train.loop import BatchSource, Trainer

log = logging.getLogger("lokr")


@dataclass
class TrainingRun:
    trainer: Trainer
    state: TrainState  # where to continue from: a fresh start or the resumed checkpoint's position
    offload: GroupOffload | None
    renders: bool = True  # whether the main process alone can run the model (validation, eval loss)


def train_adapter(
    ctx: JobContext,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    checkpoint_hooks: Iterable[CheckpointHook] = (),
) -> Path:
    """Train (or resume training) the LoKr adapter, or the whole transformer with ``model_type: full``;
    return the path of ``pytorch_lora_weights.safetensors`` (or of the ``transformer/`` folder).

    Raises ``TransientError`` (exit 75) when ``should_stop`` ended the run early with a checkpoint saved.
    """
    from job.cache.dataset import TrainingData
    from job.distributed import any_rank, make_accelerator
    from job.train.output import ADAPTER_FILE, TRANSFORMER_DIR, is_finished
    from job.train.schedule import total_steps

    started = time.perf_counter()
    config, job, workdir = ctx.config, ctx.config.job, ctx.workdir
    _check_trainable(ctx)
    full_rank = job.model_type == "full"
    # Full-rank: DeepSpeed counts the accumulation itself; telling accelerate too keeps it from warning.
    accumulation = job.gradient_accumulation_steps if full_rank else 1
    accelerator = make_accelerator(
        mixed_precision=job.mixed_precision,
        deepspeed_plugin=_deepspeed(ctx),
        gradient_accumulation_steps=accumulation,
    )
    should_stop = any_rank(should_stop)  # all ranks stop at the same step boundary
    data = TrainingData.open(ctx, world_size=accelerator.num_processes, rank=accelerator.process_index)
    total = total_steps(job, data.batches_per_epoch)
    result = workdir.output / (TRANSFORMER_DIR if full_rank else ADAPTER_FILE)
    if is_finished(workdir.output, config_hash=config.hash, step=total):
        log.info(
            "train: %s already holds this config's weights at step %d; nothing to do", workdir.output, total
        )
        return result

    if full_rank:
        from job.train.full import build_full_rank_trainer

        run = build_full_rank_trainer(
            ctx, accelerator, data, total, should_stop=should_stop, checkpoint_hooks=checkpoint_hooks
        )
    else:
        run = build_trainer(
            ctx, accelerator, data, total, should_stop=should_stop, checkpoint_hooks=checkpoint_hooks
        )
    log.info("train: set up in %.1f s", time.perf_counter() - started)
    if accelerator.is_main_process:
        from job.train.observers import TrainingObserver

        run.trainer.observer = TrainingObserver.for_run(ctx, run, data)
    try:
        finished = run.trainer.train(run.state, total)
    finally:
        if run.offload is not None:
            run.offload.close()
    if not finished:
        raise TransientError(
            f"training stopped early at step {run.state.step}; its state is in {workdir.checkpoints}; "
            "run again to continue"
        )

    run.trainer.save_output(workdir.output, config_hash=config.hash, step=total)
    if accelerator.is_main_process:
        log.info("train: %s written to %s", "transformer" if full_rank else "adapter", result)
    accelerator.wait_for_everyone()
    return result


def build_trainer(
    ctx: JobContext,
    accelerator: Accelerator,
    data: BatchSource,
    total: int,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    checkpoint_hooks: Iterable[CheckpointHook] = (),
) -> TrainingRun:
    """Load and prepare the model, attach LoKr, build optimizer, schedule and EMA, resume per the config."""
    from job.model.lokr import attach_lokr
    from job.model.offload import apply_group_offload
    from job.model.source import local_model_path
    from job.model.transformer import load_dtype, load_transformer, prepare_base_model
    from job.train.checkpointer import Checkpointer
    from job.train.ema import AdapterEMA
    from job.train.loop import LoKrTrainer
    from job.train.optimizers import adapter_dtype, build_optimizer, optimizer_overrides
    from job.train.schedule import build_lr_scheduler
    from job.train.state import TrainingObjects, load_training_state, save_training_state

    config, job, workdir = ctx.config, ctx.config.job, ctx.workdir
    _check_trainable(ctx)
    log.info(
        "train: %s (%s), %d steps of batch %d x %d, %d batches an epoch",
        job.model_source,
        job.base_model_precision,
        total,
        job.train_batch_size,
        job.gradient_accumulation_steps,
        data.batches_per_epoch,
    )
    transformer = load_transformer(local_model_path(job, workdir), dtype=load_dtype(job))
    transformer = prepare_base_model(transformer, job, accelerator.device)
    network = attach_lokr(transformer, config.lycoris, seed=job.seed)
    network.to(device=accelerator.device, dtype=adapter_dtype(job.optimizer))
    network.requires_grad_(True)
    offload = apply_group_offload(transformer, job, workdir.offload, accelerator.device)
    optimizer = build_optimizer(
        job.optimizer, network.parameters(), job.learning_rate, optimizer_overrides(job)
    )
    objects = TrainingObjects(
        network=network,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(job, optimizer, total),
        ema=(
            AdapterEMA(list(network.named_parameters()), job.ema_decay, warmup_steps=job.ema_warmup_steps)
            if job.use_ema
            else None
        ),
        lycoris=config.lycoris,
    )

    resumed = resume_state(
        ctx,
        total,
        lambda folder: load_training_state(
            folder, objects, config_hash=config.hash, world_size=accelerator.num_processes
        ),
    )
    checkpointer = Checkpointer(
        workdir.checkpoints,
        lambda folder, at: save_training_state(
            folder, objects, at, config_hash=config.hash, world_size=accelerator.num_processes
        ),
        accelerator,
        total_limit=job.checkpoints_total_limit,
    )
    checkpointer.on_complete.extend(checkpoint_hooks)
    if resumed is not None:
        checkpointer.last_saved_step = resumed.step
    trainer = LoKrTrainer(
        accelerator=accelerator,
        transformer=transformer,
        objects=objects,
        data=data,
        job=job,
        # prepare_base_model cast the weights to load_dtype: the inputs follow them.
        input_dtype=load_dtype(job),
        checkpointer=checkpointer,
        should_stop=should_stop,
    )
    return TrainingRun(trainer=trainer, state=resumed or TrainState(), offload=offload)


def resume_state(
    ctx: JobContext, total: int, load: Callable[[Path], TrainState], *, load_is_atomic: bool = True
) -> TrainState | None:
    """Restore the checkpoint ``resume_from_checkpoint`` names with ``load``; its position, or None when
    training starts fresh. Every process resumes from the same checkpoint.

    With ``latest``, a complete checkpoint whose contents fail to load (``load`` raises anything but a
    ``JobError``, which means this config cannot continue it) is set aside, here and at the run URI, and the
    one before is tried. ``load_is_atomic``: a failed ``load`` leaves the objects as they were; when it may
    not (DeepSpeed's ``load_state``) and nothing loads, the process exits 75 to start fresh on clean ones.
    """
    from job.distributed import require_same
    from job.train.checkpoint import resolve_resume

    root, setting = ctx.workdir.checkpoints, ctx.config.job.resume_from_checkpoint
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
        _set_aside(ctx, resume, problem)
    if failed and not load_is_atomic:
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
    from job.distributed import require_same
    from job.train.checkpoint import latest_complete

    latest = latest_complete(root)
    require_same(latest.name if latest is not None else None, "the checkpoint to resume from")
    return latest


def _try_load(folder: Path, load: Callable[[Path], TrainState]) -> tuple[str, TrainState | None]:
    """``load(folder)``, or why it failed on any process (every process learns the same outcome)."""
    from job.distributed import any_rank

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


def _set_aside(ctx: JobContext, folder: Path, problem: str) -> None:
    """Move ``folder`` aside on this machine and, when it came from the run URI, there too; then fetch the
    run URI's next newest checkpoint if it is newer than what is left here."""
    from job import distributed
    from job.train.checkpoint import checkpoint_step, set_aside
    from job.train.remote import download_newer_checkpoint, set_aside_remote

    moved: Path | None = None

    def locally() -> None:
        nonlocal moved
        moved = set_aside(folder, problem)

    distributed.once_per_machine(locally)
    if not ctx.run_uri:
        return
    run_uri, step = ctx.run_uri, checkpoint_step(folder)

    def remotely() -> None:
        if moved is not None and step is not None:  # None: another machine sharing the folder moved it
            set_aside_remote(run_uri, moved, step)

    distributed.once(remotely)
    distributed.once_per_machine(lambda: download_newer_checkpoint(run_uri, ctx.workdir.checkpoints))


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


def _check_trainable(ctx: JobContext) -> None:
    if ctx.config.job.model_type == "full":
        from job.model.deepspeed import require_deepspeed

        require_deepspeed()
    elif ctx.config.lycoris is None:
        raise ConfigError(
            "lycoris_config is not set: training a LoKr adapter needs one (see the seed's example)"
        )


def _deepspeed(ctx: JobContext) -> DeepSpeedPlugin | None:
    if ctx.config.job.model_type != "full":
        return None
    from job.model.deepspeed import deepspeed_plugin

    return deepspeed_plugin(ctx.config.job)
