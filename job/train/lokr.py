"""LoKr training (``model_type: lora``): a LyCORIS LoKr adapter trains on the frozen transformer, which
may be quantized or group-offloaded; the base weights never change.

A checkpoint's own part (``LoKrState``) is the adapter, the EMA and the optimizer; the schedule, random
states and position are written by ``job.train.state.TrainingCheckpoint`` as for full-rank. The output is
``pytorch_lora_weights.safetensors`` (``job.train.output``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from job.config.schema import LycorisConfig
from job.context import JobContext
from job.errors import ConfigError
from job.train.loop import Trainer, TrainingRun
from job.train.output import write_output
from job.train.resume import resume_and_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator
    from lycoris import LycorisNetwork

    from job.train.ema import AdapterEMA
    from job.train.loop import BatchSource

log = logging.getLogger("lokr")

ADAPTER_FILE = "lokr.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class LoKrObjects:
    """The stateful parts of LoKr training."""

    network: LycorisNetwork
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AdapterEMA | None
    lycoris: LycorisConfig


class LoKrState:
    """The LoKr's part of a checkpoint: ``lokr.safetensors``, ``ema.safetensors`` (``use_ema``) and
    ``optimizer.pt``, written by the main process (every rank holds the same adapter)."""

    collective = False
    load_is_atomic = True

    def __init__(self, objects: LoKrObjects):
        self.objects = objects

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from job.model.lokr import save_adapter

        objects = self.objects
        save_adapter(objects.network, folder / ADAPTER_FILE, objects.lycoris)
        if objects.ema is not None:
            save_file(objects.ema.state_dict(), str(folder / EMA_FILE))
        torch.save(objects.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def read(self, folder: Path, record: dict[str, Any], *, same_recipe: bool) -> Callable[[], None]:
        from safetensors.torch import load_file

        objects = self.objects
        adapter = load_file(str(folder / ADAPTER_FILE))
        _check_adapter(objects.network, adapter, folder, same_recipe=same_recipe)
        ema = None
        if objects.ema is not None:
            if not (folder / EMA_FILE).is_file():
                raise ConfigError(
                    f"use_ema is on but checkpoint {folder} has no EMA state (it was trained without EMA); "
                    "set use_ema false to continue it, or resume_from_checkpoint none to start over"
                )
            ema = load_file(str(folder / EMA_FILE))
            _check_shapes(objects.ema.state_dict(), ema, EMA_FILE)
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)

        def apply() -> None:
            # The optimizer checks its groups before it changes anything: first, so its refusal changes nothing.
            objects.optimizer.load_state_dict(optimizer)
            objects.network.load_state_dict(adapter, strict=True)
            if objects.ema is not None and ema is not None:
                objects.ema.load_state_dict(ema)

        return apply


class LoKrTrainer(Trainer):
    """Trains the LoKr adapter on the frozen (maybe quantized or offloaded) transformer."""

    def __init__(self, *, objects: LoKrObjects, **kwargs: Any):
        super().__init__(objects=objects, **kwargs)
        self.objects: LoKrObjects = objects
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
    from job.train.ema import AdapterEMA
    from job.train.optimizers import adapter_dtype, build_optimizer, optimizer_overrides
    from job.train.schedule import build_lr_scheduler
    from job.train.state import TrainingCheckpoint

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
    transformer = load_transformer(
        local_model_path(job, workdir), dtype=load_dtype(job), precision=job.base_model_precision
    )
    transformer = prepare_base_model(transformer, job, accelerator.device)
    network = attach_lokr(transformer, config.lycoris, seed=job.seed)
    network.to(device=accelerator.device, dtype=adapter_dtype(job.optimizer))
    network.requires_grad_(True)
    offload = apply_group_offload(transformer, job, workdir.offload, accelerator.device)
    optimizer = build_optimizer(
        job.optimizer, network.parameters(), job.learning_rate, optimizer_overrides(job)
    )
    objects = LoKrObjects(
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

    checkpoint = TrainingCheckpoint(
        LoKrState(objects), objects.scheduler, accelerator, config_hash=config.hash
    )
    state, checkpointer = resume_and_checkpoint(
        checkpoint, workdir.checkpoints, job, run_uri=ctx.run_uri, total=total
    )
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
    return TrainingRun(trainer=trainer, state=state, offload=offload)


def _check_adapter(
    network: LycorisNetwork, tensors: dict[str, torch.Tensor], folder: Path, *, same_recipe: bool
) -> None:
    expected = network.state_dict()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - set(expected))[:3]
        raise ConfigError(
            f"checkpoint {folder} holds a different LoKr layout (missing {missing}, unexpected {unexpected}); "
            "lycoris_config changed since it was written: restore it, or set resume_from_checkpoint none"
        )
    try:
        _check_shapes(expected, tensors, ADAPTER_FILE)
    except ValueError as exc:
        if same_recipe:
            raise  # written under this very config: the file is damaged
        raise ConfigError(
            f"checkpoint {folder} holds a different LoKr layout ({exc}); lycoris_config changed since it was "
            "written: restore it, or set resume_from_checkpoint none"
        ) from exc


def _check_shapes(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in expected.items():
        if name not in got:
            raise ValueError(f"{what} lacks {name}")
        if got[name].shape != tensor.shape:
            raise ValueError(f"{what}: {name} is {tuple(got[name].shape)}, expected {tuple(tensor.shape)}")
