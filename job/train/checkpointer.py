"""Saving checkpoints while training: where, rotation, and the hooks told about each finished one.

What goes into a checkpoint is the ``write`` callable's business (``state.save_training_state`` for a LoKr,
``full.save_full_rank_state`` for full-rank). A LoKr checkpoint is written by the main process alone (every
rank holds the same adapter); a ``collective`` one (ZeRO shards) by every process into one shared folder,
which the main process then seals with the marker and renames into place.

``on_complete`` callables get ``(path, step)`` once a checkpoint is complete and rotation is done, e.g. to
upload it to the run URI in the background (they run on the main process only, and must not block long).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from job.train.checkpoint import rotate, seal_checkpoint, shared_staging_folder, write_checkpoint
from job.train.state import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("lokr")

CheckpointHook = Callable[[Path, int], None]
CheckpointWriter = Callable[[Path, TrainState], None]


class Checkpointer:
    def __init__(
        self,
        root: Path,
        write: CheckpointWriter,
        accelerator: Accelerator,
        *,
        total_limit: int | None,
        collective: bool = False,
    ):
        self.root = root
        self.write = write
        self.accelerator = accelerator
        self.total_limit = total_limit
        self.collective = collective
        self.on_complete: list[CheckpointHook] = []
        self.last_saved_step: int | None = None

    def save(self, state: TrainState) -> None:
        started = time.perf_counter()
        path = self._write_collectively(state) if self.collective else self._write_on_main(state)
        if path is not None:
            rotate(self.root, self.total_limit)
            log.info("checkpoint %s saved in %.1f s", path.name, time.perf_counter() - started)
            for hook in self.on_complete:
                hook(path, state.step)
        self.accelerator.wait_for_everyone()
        self.last_saved_step = state.step

    def _write_on_main(self, state: TrainState) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        return write_checkpoint(self.root, state.step, lambda folder: self.write(folder, state))

    def _write_collectively(self, state: TrainState) -> Path | None:
        staging = shared_staging_folder(self.root, state.step)
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # left by an attempt that died mid-write
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.write(staging, state)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        try:
            return seal_checkpoint(self.root, state.step, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
