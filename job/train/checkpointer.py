"""Saving checkpoints while training: where, rotation, and the hooks told about each finished one.

What goes into a checkpoint is ``state.TrainingCheckpoint``'s business, the same writer for both trainers.
Every process first hands its random state to the main process; then a LoKr checkpoint is written by the
main process alone (every rank holds the same adapter), a ``collective`` one (ZeRO shards) by every process
into one shared folder, which the main process then seals with the marker and renames into place.

``on_complete`` callables get ``(path, step)`` once a checkpoint is complete and rotation is done, e.g. to
upload it to the run URI in the background (they run on the main process only, and must not block long).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from job.train.checkpoint import rotate, seal_checkpoint, shared_staging_folder, write_checkpoint
from job.train.state import TrainingCheckpoint, TrainState, gather_rng_states

log = logging.getLogger("lokr")

CheckpointHook = Callable[[Path, int], None]


class Checkpointer:
    def __init__(
        self,
        root: Path,
        checkpoint: TrainingCheckpoint,
        *,
        total_limit: int | None,
        last_saved_step: int | None = None,
    ):
        self.root = root
        self.checkpoint = checkpoint
        self.accelerator = checkpoint.accelerator
        self.total_limit = total_limit
        self.collective = checkpoint.model.collective
        self.on_complete: list[CheckpointHook] = []
        self.last_saved_step = last_saved_step

    def save(self, state: TrainState) -> None:
        started = time.perf_counter()
        rng_states = gather_rng_states(self.accelerator)

        def write(folder: Path) -> None:
            self.checkpoint.save(folder, state, rng_states)

        writer = self._write_collectively if self.collective else self._write_on_main
        path = writer(state.step, write)
        if path is not None:
            rotate(self.root, self.total_limit)
            log.info("checkpoint %s saved in %.1f s", path.name, time.perf_counter() - started)
            for hook in self.on_complete:
                hook(path, state.step)
        self.accelerator.wait_for_everyone()
        self.last_saved_step = state.step

    def _write_on_main(self, step: int, write: Callable[[Path], None]) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        return write_checkpoint(self.root, step, write)

    def _write_collectively(self, step: int, write: Callable[[Path], None]) -> Path | None:
        staging = shared_staging_folder(self.root, step)
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # left by an attempt that died mid-write
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        write(staging)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        try:
            return seal_checkpoint(self.root, step, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
