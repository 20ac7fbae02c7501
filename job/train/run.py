"""The ``train`` stage: pick the trainer the config asks for, run its loop and write its output.

``model_type: lora`` trains a LoKr adapter (``job.train.lokr``); ``model_type: full`` every weight, with
DeepSpeed (``job.train.full``). Idempotent: when ``output/`` already holds this config's weights at the
final step, nothing is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from job.context import JobContext
from job.errors import ConfigError, TransientError
from job.train.checkpointer import CheckpointHook

if TYPE_CHECKING:
    from accelerate.utils import DeepSpeedPlugin

log = logging.getLogger("lokr")


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
    data = TrainingData.open(
        ctx.config, ctx.workdir, world_size=accelerator.num_processes, rank=accelerator.process_index
    )
    total = total_steps(job, data.batches_per_epoch)
    result = workdir.output / (TRANSFORMER_DIR if full_rank else ADAPTER_FILE)
    if is_finished(workdir.output, config_hash=config.hash, step=total):
        log.info(
            "train: %s already holds this config's weights at step %d; nothing to do", workdir.output, total
        )
        return result

    if full_rank:
        from job.train.full import build_full_rank_trainer

        run = build_full_rank_trainer(ctx, accelerator, data, total)
    else:
        from job.train.lokr import build_lokr_trainer

        run = build_lokr_trainer(ctx, accelerator, data, total)
    # When to stop and who hears of each checkpoint are the run's, whichever trainer it runs.
    run.trainer.should_stop = should_stop
    if run.trainer.checkpointer is not None:
        run.trainer.checkpointer.on_complete.extend(checkpoint_hooks)
    log.info("train: set up in %.1f s", time.perf_counter() - started)
    if accelerator.is_main_process:
        from job.train.observers import TrainingObserver

        run.trainer.observer = TrainingObserver.for_run(ctx.config, ctx.workdir, ctx.run_uri, run, data)
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


def _check_trainable(ctx: JobContext) -> None:
    if ctx.config.job.evaluation_type == "clip":
        from job.model.source import evaluation_model_path

        # Before step 1, not at the first validation: scoring there would fail and be logged as a warning.
        evaluation_model_path(ctx.config.job, ctx.workdir)
    if ctx.config.job.validation_preview and ctx.config.job.webhook_url:
        from job.model.source import preview_model_path

        preview_model_path(ctx.config.job, ctx.workdir)
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
