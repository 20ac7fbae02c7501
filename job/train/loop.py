"""The training loop both trainers share: optimizer steps of flow-matching loss on the LoKr-wrapped
transformer (``job.train.lokr``) or on every weight of it (``job.train.full``); each of those modules
builds its trainer into a ``TrainingRun``.

Each step draws its σ, noise and caption-dropout decisions (then, with scheduled sampling, which samples
roll out: ``job.train.rollout``) from a generator seeded by (seed, step, rank) and reads its batches by
(epoch, index), so a step is a pure function of the checkpointed state: an interrupted run continues bit
for bit. ``should_stop`` is checked at every step boundary; when it says stop, the loop checkpoints and
returns False. An ``observer`` (validation, trackers, webhook; main process only) is told about the start,
each step, the end and a failure; its time is left out of s/step.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from job.config.schema import JobConfig
from job.flow_matching import draw_step, flow_target, schedule_shift, step_generator
from job.train.checkpointer import Checkpointer
from job.train.loss import ReflexFlow, training_loss
from job.train.progress import StepReport, TrainProgress
from job.train.rollout import scheduled_sampling_input
from job.train.state import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

    from job.model.offload.hooks import GroupOffload

log = logging.getLogger("lokr")


class BatchSource(Protocol):
    """What the loop needs of ``job.cache.dataset.TrainingData``."""

    batches_per_epoch: int

    def batch(self, epoch: int, index: int) -> Any: ...

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class Optimization(Protocol):
    """What a step drives: the optimizer and the learning-rate schedule (stepped once per optimizer step)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None = None  # the trained weights' gradient norm before clipping


class StepObserver(Protocol):
    """What the loop tells ``job.train.observers.TrainingObserver``."""

    def on_start(self, step: int, total: int) -> None: ...

    def on_step(self, step: int, result: StepResult, seconds: float) -> None: ...

    def on_end(self, step: int, *, finished: bool) -> None: ...

    def on_failure(self, step: int, exc: BaseException) -> None: ...


class Trainer(ABC):
    """The loop and the loss, shared by both kinds of training; subclasses apply the gradients."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        transformer: torch.nn.Module,
        objects: Optimization,
        data: BatchSource,
        job: JobConfig,
        input_dtype: torch.dtype,
        checkpointer: Checkpointer | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        log_every: int = 10,
    ):
        self.accelerator = accelerator
        self.transformer = transformer
        # What the step calls: the transformer itself, or the engine wrapping it (full-rank).
        self.forward_module: Callable[..., Any] = transformer
        self.objects = objects
        self.data = data
        self.job = job
        self.input_dtype = input_dtype
        self.checkpointer = checkpointer
        self.should_stop = should_stop
        self.log_every = log_every
        self.patch_size = transformer.config.patch_size
        self._null_embedding: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observer: StepObserver | None = None

    def train(self, state: TrainState, total: int) -> bool:
        """Run optimizer steps until ``total``; False when ``should_stop`` ended it early (state saved)."""
        progress = TrainProgress(total, state.step, log_every=self.log_every)
        started = time.perf_counter()
        first = state.step + 1
        observer = self.observer
        if observer is not None:
            observer.on_start(state.step, total)
        try:
            while state.step < total:
                if self.should_stop():
                    self._checkpoint(state)
                    if observer is not None:
                        observer.on_end(state.step, finished=False)
                    return False
                result = self.step(state)
                if state.step == first:
                    log.info("first step done %.1f s after the loop started", time.perf_counter() - started)
                progress.update(StepReport(step=state.step, loss=result.loss, lr=result.lr))
                if observer is not None:
                    observer.on_step(state.step, result, progress.durations[-1])
                    progress.reset_clock()
                if state.step % self.job.checkpoint_step_interval == 0 or state.step == total:
                    self._checkpoint(state)
                    progress.reset_clock()
            if observer is not None:
                observer.on_end(state.step, finished=True)
        except BaseException as exc:
            if observer is not None:
                observer.on_failure(state.step, exc)
            raise
        finally:
            progress.close()
        return True

    def step(self, state: TrainState) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; advances ``state``."""
        accumulation = self.job.gradient_accumulation_steps
        generator = step_generator(self.job.seed, state.step, self.accelerator.process_index)
        optimizer = self.objects.optimizer
        optimizer.zero_grad(set_to_none=True)
        position = replace(state)
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for index in range(accumulation):
            # Read in line: a read-ahead thread contends for the GIL with the step's many small ops and
            # cost more than the read it hid (measured with scripts/bench_train.py).
            batch = self.data.batch(position.epoch, position.batch_index)
            position.advance(self.data.batches_per_epoch)
            loss = self.micro_batch_loss(batch, generator, state.step)
            self.backward(loss, last=index == accumulation - 1)
            loss_sum += loss.detach()
        lr = float(optimizer.param_groups[0]["lr"])
        grad_norm = self.apply_gradients()
        self.objects.scheduler.step()
        state.step += 1
        self.after_optimizer_step(state.step)
        state.epoch, state.batch_index = position.epoch, position.batch_index
        return StepResult(loss=float(loss_sum) / accumulation, lr=lr, grad_norm=grad_norm)

    def micro_batch_loss(self, batch: Any, generator: torch.Generator, step: int) -> torch.Tensor:
        device = self.accelerator.device
        latents = batch.latents.to(device=device, dtype=torch.float32)
        shift = schedule_shift(
            self.job.flow_schedule_shift,
            self.job.flow_schedule_auto_shift,
            (latents.shape[-2], latents.shape[-1]),
            self.patch_size,
        )
        draws = draw_step(generator, latents.shape, shift=shift)
        sigmas = draws.sigmas.to(device)
        noise = draws.noise.to(device)
        embeds, mask = self._captions(batch, draws.dropout_draws)
        # On the device once: the rollout's and ReflexFlow's extra forwards and the base prediction use them.
        embeds, mask = embeds.to(device), mask.to(device)
        # SimpleTuner's scheduled sampling: some inputs are the model's own short rollout, made without a graph.
        rolled = scheduled_sampling_input(
            self.job, step, generator, self.predict, latents, noise, sigmas, embeds, mask
        )
        noisy = rolled.noisy
        target = flow_target(latents, noise)
        regularisation = batch.is_regularisation.to(device=device, dtype=torch.bool)
        if bool(regularisation.any()):
            # Prior preservation: on regularisation images the target is what the base model predicts.
            target = target.clone()
            target[regularisation] = self.base_prediction(
                noisy[regularisation], embeds[regularisation], mask[regularisation], sigmas[regularisation]
            ).float()
        prediction = self.predict(noisy, embeds, mask, sigmas)
        job = self.job
        reflexflow = None
        if job.reflexflow:
            reflexflow = ReflexFlow(
                alpha=job.scheduled_sampling_reflexflow_alpha,
                beta1=job.scheduled_sampling_reflexflow_beta1,
                beta2=job.scheduled_sampling_reflexflow_beta2,
                drift=noisy - latents,
                exposure=rolled.exposure,
            )
        return training_loss(
            prediction,
            target,
            sigmas,
            loss_type=job.loss_type,
            huber_c=job.huber_c,
            huber_schedule=job.huber_schedule,
            mask=None if batch.loss_mask is None else batch.loss_mask.to(device),
            reflexflow=reflexflow,
        )

    def predict(
        self, noisy: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        device = self.accelerator.device
        # As the AuraFlow pipeline does: padding positions of the text embedding are zeroed.
        embeds = embeds.to(device=device, dtype=torch.float32) * mask.to(device).unsqueeze(-1).float()
        with self.accelerator.autocast():
            return self.forward_module(
                hidden_states=noisy.to(self.input_dtype),
                encoder_hidden_states=embeds.to(self.input_dtype),
                # σ itself, in fp32: the time embedding scales by 1000 and casts to the model dtype itself.
                timestep=sigmas.float(),
                return_dict=False,
            )[0]

    @abstractmethod
    def base_prediction(
        self, noisy: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """The untrained model's prediction, the target on regularisation images."""

    def _captions(self, batch: Any, dropout_draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the captions the step's draws drop (per-sample probability) by the empty prompt's."""
        embeds, mask = batch.prompt_embeds, batch.prompt_mask
        dropped = dropout_draws < batch.caption_dropout.float().cpu()
        if not bool(dropped.any()):
            return embeds, mask
        if self._null_embedding is None:
            self._null_embedding = self.data.null_embedding()
        null_embeds, null_mask = self._null_embedding
        embeds = torch.where(dropped.view(-1, 1, 1), null_embeds.to(embeds.dtype), embeds)
        mask = torch.where(dropped.view(-1, 1), null_mask.to(mask.dtype), mask)
        return embeds, mask

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Backpropagate one micro-batch's loss (``last``: the step's final micro-batch)."""

    @abstractmethod
    def apply_gradients(self) -> float | None:
        """Apply the step's gradients; return their norm before clipping (None when not measured)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called once ``step`` (counted from 1) has been applied; nothing to do unless a subclass says."""
        return None

    @abstractmethod
    def save_output(self, output_dir: Path, *, config_hash: str, step: int) -> None:
        """Write the trained weights to ``output/`` (called on every process; one of them writes)."""

    def _checkpoint(self, state: TrainState) -> None:
        if self.checkpointer is None or state.step == 0 or self.checkpointer.last_saved_step == state.step:
            return
        self.checkpointer.save(state)


@dataclass
class TrainingRun:
    """A built trainer and where it starts: what ``job.train.lokr`` and ``job.train.full`` hand the run."""

    trainer: Trainer
    state: TrainState  # where to continue from: a fresh start or the resumed checkpoint's position
    offload: GroupOffload | None
    renders: bool = True  # whether the main process alone can run the model (validation, eval loss)
