"""Full-rank training (``model_type: full``): every transformer weight trains, sharded by DeepSpeed ZeRO-2/3.

accelerate prepares the transformer and the optimizer into a DeepSpeed engine. The loop drives the engine
itself (backward per micro-batch, ``step`` after the last): accelerate's ``backward`` would mark every
micro-batch as an accumulation boundary and step the optimizer each time. Clipping is the engine's
(``gradient_clipping``, from ``max_grad_norm``). The learning-rate schedule is lokr-job's own, built on the
optimizer before ``prepare``: ZeRO's optimizer keeps that optimizer's param-group dicts, so the engine
steps with the scheduled rate.

A checkpoint's own part (``ZeroState``) is ``accelerate.save_state``: every process writes its ZeRO shards
(and accelerate its random state) into one shared folder; the schedule, every rank's random state and the
position are written by ``job.train.state.TrainingCheckpoint`` as for a LoKr, and sealed by the same
``COMPLETE`` marker. ZeRO partitions belong to their rank, so a resume needs the same number of processes.

The output is the whole transformer (ZeRO-3 gathers it on the main process), as diffusers saves it.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from job.context import JobContext
from job.errors import ConfigError
from job.train.loop import Trainer, TrainingRun
from job.train.resume import resume_and_checkpoint
from job.train.state import TrainingCheckpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from job.train.loop import BatchSource

log = logging.getLogger("lokr")

# diffusers' file names, sharded (with an index) past this size as its save_pretrained does.
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


@dataclass
class FullRankObjects:
    """The stateful parts of full-rank training."""

    engine: Any  # deepspeed.DeepSpeedEngine: the prepared transformer
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of the ZeRO optimizer (its param groups)
    scheduler: torch.optim.lr_scheduler.LRScheduler


class FullRankTrainer(Trainer):
    def __init__(self, *, objects: FullRankObjects, **kwargs: Any):
        super().__init__(objects=objects, **kwargs)
        self.objects: FullRankObjects = objects
        self.engine = objects.engine
        self.forward_module = objects.engine

    def base_prediction(
        self, noisy: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        raise ConfigError(
            "is_regularisation_data needs model_type lora: full-rank training has no untrained model to "
            "predict the regularisation targets"
        )

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        # The engine divides the loss by gradient_accumulation_steps itself.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def apply_gradients(self) -> float | None:
        self.engine.step()  # clip, optimizer step, zero the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save_output(self, output_dir: Path, *, config_hash: str, step: int) -> None:
        write_full_rank_output(self.accelerator, self.objects, output_dir, config_hash=config_hash, step=step)


def build_full_rank_trainer(
    ctx: JobContext, accelerator: Accelerator, data: BatchSource, total: int
) -> TrainingRun:
    """Load the transformer, make every weight trainable, prepare it with DeepSpeed, resume per the config."""
    from job.model.checkpointing import enable_block_checkpointing
    from job.model.source import local_model_path
    from job.model.transformer import load_dtype, load_transformer
    from job.train.optimizers import build_optimizer, optimizer_overrides
    from job.train.schedule import build_lr_scheduler

    config, job, workdir = ctx.config, ctx.config.job, ctx.workdir
    # DeepSpeed's ZeRO collectives call torch's renamed all_gather/reduce_scatter: a warning on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    plugin = accelerator.state.deepspeed_plugin
    log.info(
        "train: full-rank %s with DeepSpeed ZeRO-%d, %d steps of batch %d x %d on %d process(es)",
        job.model_source,
        plugin.zero_stage,
        total,
        job.train_batch_size,
        job.gradient_accumulation_steps,
        accelerator.num_processes,
    )
    transformer = load_transformer(local_model_path(job, workdir), dtype=load_dtype(job))
    if job.gradient_checkpointing:
        enable_block_checkpointing(transformer, job.gradient_checkpointing_interval)
    transformer.requires_grad_(True)
    transformer.train()
    optimizer = build_optimizer(
        job.optimizer, transformer.parameters(), job.learning_rate, optimizer_overrides(job)
    )
    scheduler = build_lr_scheduler(job, optimizer, total)
    engine, prepared_optimizer = accelerator.prepare(transformer, optimizer)
    objects = FullRankObjects(engine=engine, optimizer=prepared_optimizer, scheduler=scheduler)

    _require_shared_checkpoints(accelerator, workdir.checkpoints)
    checkpoint = TrainingCheckpoint(ZeroState(accelerator), scheduler, accelerator, config_hash=config.hash)
    state, checkpointer = resume_and_checkpoint(
        checkpoint, workdir.checkpoints, job, run_uri=ctx.run_uri, total=total
    )
    module = accelerator.unwrap_model(engine)
    trainer = FullRankTrainer(
        accelerator=accelerator,
        transformer=module,
        objects=objects,
        data=data,
        job=job,
        input_dtype=module.dtype,
        checkpointer=checkpointer,
    )
    # Under ZeRO-3 every rank holds a slice of each weight, and a forward pass needs all ranks: the main
    # process alone (validation, eval loss) would wait for the others forever.
    renders = plugin.zero_stage < 3 or accelerator.num_processes == 1
    if not renders and accelerator.is_main_process:
        log.warning(
            "validation images and eval loss are off: ZeRO-3 on %d processes shards every weight; render from "
            "output/transformer with lokr-job infer after training",
            accelerator.num_processes,
        )
    return TrainingRun(trainer=trainer, state=state, offload=None, renders=renders)


def _require_shared_checkpoints(accelerator: Accelerator, root: Path) -> None:
    """Every process writes its shards into one checkpoint folder: all of them must see the same folder
    (one machine, or a work directory on a shared filesystem)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    from job.distributed import require_same

    probe = root / ".shared-probe"
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0], encoding="utf-8")
    broadcast_object_list(token)
    seen = probe.read_text(encoding="utf-8") if probe.is_file() else None
    try:
        require_same(seen == token[0], f"whether {root} is one shared folder")
    except ConfigError as exc:
        raise ConfigError(
            f"model_type full: every process writes its ZeRO shards into {root}, but some processes do not "
            "see the folder rank 0 writes (several machines, each with its own work directory); put the "
            "work directory on a filesystem all machines share"
        ) from exc


class ZeroState:
    """Full-rank's part of a checkpoint: what ``accelerate.save_state`` writes for the prepared DeepSpeed
    engine, every process its own shards (``job.train.pickles`` has checked them before they are loaded)."""

    collective = True
    load_is_atomic = False  # DeepSpeed's load_state may fail half-way

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def save(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def read(self, folder: Path, record: dict[str, Any], *, same_recipe: bool) -> Callable[[], None]:
        accelerator = self.accelerator
        written_by = record.get("world_size", 1)
        if written_by != accelerator.num_processes:
            raise ConfigError(
                f"checkpoint {folder} holds ZeRO shards of {written_by} process(es), this run has "
                f"{accelerator.num_processes}: run with {written_by} processes to continue it, or set "
                "resume_from_checkpoint none to start over"
            )
        return lambda: accelerator.load_state(str(folder))


def write_full_rank_output(
    accelerator: Accelerator, objects: FullRankObjects, output_dir: Path, *, config_hash: str, step: int
) -> Path:
    """Gather the trained transformer (every process takes part) and write it from the main process."""
    from huggingface_hub import save_torch_state_dict

    from job.train.output import MAX_SHARD_SIZE, TRANSFORMER_DIR, write_full_output

    weights = accelerator.get_state_dict(objects.engine)
    if accelerator.is_main_process:
        # ZeRO-3's gathered weights can be views into a larger buffer, which safetensors refuses to write.
        weights = {
            name: tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
            for name, tensor in weights.items()
        }
        module = accelerator.unwrap_model(objects.engine)

        def save(folder: Path) -> None:
            module.save_config(folder)
            save_torch_state_dict(
                weights, folder, filename_pattern=WEIGHTS_PATTERN, max_shard_size=MAX_SHARD_SIZE
            )

        write_full_output(output_dir, save, config_hash=config_hash, step=step)
    accelerator.wait_for_everyone()
    return output_dir / TRANSFORMER_DIR
