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
from job.errors import ConfigError, TransientError
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
    from job.model.transformer import input_dtype, load_dtype, load_transformer, prepare_base_model
    from job.train.checkpointer import Checkpointer
    from job.train.ema import AdapterEMA
    from job.train.loop import LoKrTrainer
    from job.train.optimizers import adapter_dtype, build_optimizer
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
    optimizer = build_optimizer(job.optimizer, network.parameters(), job.learning_rate)
    objects = TrainingObjects(
        network=network,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(job, optimizer, total),
        ema=AdapterEMA(list(network.named_parameters()), job.ema_decay) if job.use_ema else None,
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
        input_dtype=input_dtype(transformer, job),
        checkpointer=checkpointer,
        should_stop=should_stop,
    )
    return TrainingRun(trainer=trainer, state=resumed or TrainState(), offload=offload)


def resume_state(ctx: JobContext, total: int, load: Callable[[Path], TrainState]) -> TrainState | None:
    """Restore the checkpoint ``resume_from_checkpoint`` names with ``load``; its position, or None when
    training starts fresh. Every process must resume from the same checkpoint."""
    from job.distributed import require_same
    from job.train.checkpoint import resolve_resume

    resume = resolve_resume(ctx.workdir.checkpoints, ctx.config.job.resume_from_checkpoint)
    require_same(resume.name if resume is not None else None, "the checkpoint to resume from")
    if resume is None:
        return None
    state = load(resume)
    if state.step > total:
        raise ConfigError(
            f"resume_from_checkpoint: {resume.name} is at step {state.step}, past max_train_steps {total}; "
            "raise max_train_steps or resume from an earlier checkpoint"
        )
    log.info(
        "resumed from %s (step %d, epoch %d, batch %d)", resume, state.step, state.epoch, state.batch_index
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
