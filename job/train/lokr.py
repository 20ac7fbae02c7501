"""LoKr training (``model_type: lora``): a LyCORIS LoKr adapter trains on the frozen transformer, which
may be quantized or group-offloaded; the base weights never change.

A checkpoint is the adapter, optimizer, schedule, EMA and position (``job.train.state``); the output is
``pytorch_lora_weights.safetensors`` (``job.train.output``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from job.context import JobContext
from job.train.loop import Trainer, TrainingRun
from job.train.output import write_output
from job.train.resume import resume_state
from job.train.state import TrainingObjects, TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

    from job.train.loop import BatchSource

log = logging.getLogger("lokr")


class LoKrTrainer(Trainer):
    """Trains the LoKr adapter on the frozen (maybe quantized or offloaded) transformer."""

    def __init__(self, *, objects: TrainingObjects, **kwargs: Any):
        super().__init__(objects=objects, **kwargs)
        self.objects: TrainingObjects = objects
        self.network = objects.network
        self.multiplier = objects.lycoris.multiplier
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]

    @torch.no_grad()
    def base_prediction(
        self, noisy: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's prediction with the adapter switched off (multiplier 0)."""
        self.network.set_multiplier(0.0)
        try:
            return self.predict(noisy, embeds, mask, sigmas)
        finally:
            self.network.set_multiplier(self.multiplier)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.accelerator.backward(loss / self.job.gradient_accumulation_steps)

    def apply_gradients(self) -> float | None:
        # Average over processes, clip, step.
        self._sync_gradients()
        grad_norm = self._clip_gradients()
        self.objects.optimizer.step()
        return grad_norm

    def after_optimizer_step(self, step: int) -> None:
        # The EMA follows the new weights every ema_update_interval steps (SimpleTuner's should_update_ema).
        ema = self.objects.ema
        if ema is not None and step % self.job.ema_update_interval == 0:
            ema.update(step)

    def save_output(self, output_dir: Path, *, config_hash: str, step: int) -> None:
        if self.accelerator.is_main_process:
            objects = self.objects
            write_output(
                output_dir, objects.network, objects.ema, objects.lycoris, config_hash=config_hash, step=step
            )

    def _sync_gradients(self) -> None:
        """Average the adapter's gradients over processes (the transformer is not DDP-wrapped: it is frozen)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.parameters if p.grad is not None]
        for grad, reduced in zip(grads, self.accelerator.reduce(grads, reduction="mean"), strict=True):
            grad.copy_(reduced)

    def _clip_gradients(self) -> float | None:
        """Clip per the config; return the gradient norm before clipping when an observer wants it."""
        limit = self.job.max_grad_norm
        if limit and self.job.grad_clip_method != "value":
            return float(torch.nn.utils.clip_grad_norm_(self.parameters, limit))
        # Only an observer reads the norm: without one, skip the extra pass over the gradients.
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if self.observer is not None and grads else None
        if limit:
            torch.nn.utils.clip_grad_value_(self.parameters, limit)
        return norm


def build_lokr_trainer(
    ctx: JobContext, accelerator: Accelerator, data: BatchSource, total: int
) -> TrainingRun:
    """Load and prepare the model, attach LoKr, build optimizer, schedule and EMA, resume per the config."""
    from job.model.lokr import attach_lokr
    from job.model.offload.apply import apply_group_offload
    from job.model.source import local_model_path
    from job.model.transformer import load_dtype, load_transformer, prepare_base_model
    from job.train.checkpointer import Checkpointer
    from job.train.ema import AdapterEMA
    from job.train.optimizers import adapter_dtype, build_optimizer, optimizer_overrides
    from job.train.schedule import build_lr_scheduler
    from job.train.state import load_training_state, save_training_state

    config, job, workdir = ctx.config, ctx.config.job, ctx.workdir
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
    )
    return TrainingRun(trainer=trainer, state=resumed or TrainState(), offload=offload)
