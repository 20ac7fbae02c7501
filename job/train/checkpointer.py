"""Saving checkpoints while training: where, rotation, and the hooks told about each finished one.

``on_complete`` callables get ``(path, step)`` once a checkpoint is complete and rotation is done, e.g. to
upload it to the run URI in the background (they run on the main process only, and must not block long).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from job.train.checkpoint import rotate, write_checkpoint
from job.train.state import TrainingObjects, TrainState, save_training_state

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("lokr")

CheckpointHook = Callable[[Path, int], None]


class Checkpointer:
    def __init__(
        self,
        root: Path,
        objects: TrainingObjects,
        accelerator: Accelerator,
        *,
        config_hash: str,
        total_limit: int | None,
    ):
        self.root = root
        self.objects = objects
        self.accelerator = accelerator
        self.config_hash = config_hash
        self.total_limit = total_limit
        self.on_complete: list[CheckpointHook] = []
        self.last_saved_step: int | None = None

    def save(self, state: TrainState) -> None:
        if self.accelerator.is_main_process:
            started = time.perf_counter()
            path = write_checkpoint(
                self.root,
                state.step,
                lambda folder: save_training_state(
                    folder,
                    self.objects,
                    state,
                    config_hash=self.config_hash,
                    world_size=self.accelerator.num_processes,
                ),
            )
            rotate(self.root, self.total_limit)
            log.info("checkpoint %s saved in %.1f s", path.name, time.perf_counter() - started)
            for hook in self.on_complete:
                hook(path, state.step)
        self.accelerator.wait_for_everyone()
        self.last_saved_step = state.step
