"""What a checkpoint holds, and putting it back: everything needed to continue bit for bit.

One writer for both trainers (``TrainingCheckpoint``). Layout of ``checkpoint-<step:08d>/``:

- the trainer's own part (a ``ModelState``): for a LoKr (``job.train.lokr``) ``lokr.safetensors`` (the
  adapter in LyCORIS's key format, loadable as is), ``ema.safetensors`` (``use_ema``) and ``optimizer.pt``;
  for full-rank (``job.train.full``) what ``accelerate.save_state`` writes: every rank's ZeRO shards under
  ``pytorch_model/`` and accelerate's own ``random_states_<rank>.pkl``
- ``scheduler.pt``: the learning-rate schedule's ``state_dict()``
- ``rng.pt``: every process's Python, NumPy, torch CPU and CUDA generator states, by rank (a step's own
  randomness comes from ``job.flow_matching.step_generator``; these matter to code outside it, e.g. a
  LyCORIS dropout, which draws from each rank's global generator)
- ``trainer_state.json``: step, data position, config hash, world size, library versions
- ``COMPLETE``: written last (see ``checkpoint.py``)

Everything lokr-job reads back is safetensors, JSON or ``torch.load(weights_only=True)``; and before any
file is read, ``job.train.pickles`` refuses a checkpoint whose pickles (DeepSpeed's too) could run code.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from job.train.pickles import refuse_pickled_code

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("lokr")

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"

# The libraries whose versions decide the numbers; a resume under others is warned about.
TRACKED_LIBRARIES = (
    "lokr-job",
    "torch",
    "diffusers",
    "lycoris-lora",
    "optimum-quanto",
    "torchao",
    "accelerate",
    "torch-optimi",
    "prodigyopt",
)


@dataclass
class TrainState:
    """Where training is: optimizer steps done, and the (epoch, batch index) of the next micro-batch."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        """Move past one micro-batch."""
        self.batch_index += 1
        if self.batch_index >= batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def gather_rng_states(accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every process's generator states, by rank, on every process (all of them must call this)."""
    own = _rng_state()
    if accelerator.num_processes == 1:
        return [own]
    from accelerate.utils import gather_object

    return gather_object([own])


class ModelState(Protocol):
    """A trainer's own part of a checkpoint."""

    # Every process writes its own files into one shared folder (ZeRO shards); else the main process alone.
    collective: bool
    # A failed ``read`` or apply leaves the model as it was (DeepSpeed's load_state may not).
    load_is_atomic: bool

    def save(self, folder: Path) -> None: ...

    def read(self, folder: Path, record: dict[str, Any], *, same_recipe: bool) -> Callable[[], None]:
        """Read and check the files (raising leaves everything as it was); return what applies them.
        ``record`` is the checkpoint's ``trainer_state.json``; ``same_recipe``: written under this config."""
        ...


class TrainingCheckpoint:
    """Writes and loads a checkpoint for either trainer: its ``ModelState``, then the schedule, every
    rank's random state and the position, the same way for both."""

    def __init__(
        self,
        model: ModelState,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        accelerator: Accelerator,
        *,
        config_hash: str,
    ):
        self.model = model
        self.scheduler = scheduler
        self.accelerator = accelerator
        self.config_hash = config_hash

    def save(self, folder: Path, state: TrainState, rng_states: list[dict[str, Any]]) -> None:
        """Called by every process when ``model.collective``, else by the main process alone."""
        self.model.save(folder)
        if not self.accelerator.is_main_process:
            return
        torch.save({"ranks": rng_states}, folder / RNG_FILE)
        torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
        write_state_record(
            folder, state, config_hash=self.config_hash, world_size=self.accelerator.num_processes
        )

    def load(self, folder: Path) -> TrainState:
        """Restore every object from ``folder`` and return the position to continue from (every process).

        Every file is read and checked before any object changes (when ``model.load_is_atomic``): a
        checkpoint that fails to load (``ConfigError`` for one this config cannot continue, ``DataError``
        for one whose pickles could run code, anything else for damaged contents) leaves them as they were.
        """
        refuse_pickled_code(folder)
        state, record = read_state_record(
            folder, config_hash=self.config_hash, world_size=self.accelerator.num_processes
        )
        apply_model = self.model.read(
            folder, record, same_recipe=record.get("config_hash") == self.config_hash
        )
        scheduler = torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True)
        if set(scheduler) != set(self.scheduler.state_dict()):
            # load_state_dict would take any dict silently.
            raise ValueError(f"{SCHEDULER_FILE} holds {sorted(scheduler)}, not this schedule's fields")
        restore_rng = self._own_rng_restorer(folder)
        apply_model()
        self.scheduler.load_state_dict(scheduler)
        restore_rng()
        return state

    def _own_rng_restorer(self, folder: Path) -> Callable[[], None]:
        """What puts this process's saved generator states back (checked now, applied when called)."""
        if not (folder / RNG_FILE).is_file():
            # A full-rank checkpoint of an earlier lokr-job: accelerate's load_state restores the states.
            log.info(
                "checkpoint %s has no %s: random states as accelerate restores them", folder.name, RNG_FILE
            )
            return lambda: None
        saved = torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True)
        # A LoKr checkpoint of an earlier lokr-job holds the main process's states alone.
        ranks = saved.get("ranks", [saved])
        rank = self.accelerator.process_index
        # Another number of processes (warned about): each takes a saved rank's state, as many as there are.
        return _rng_restorer(ranks[rank % len(ranks)])


def write_state_record(folder: Path, state: TrainState, *, config_hash: str, world_size: int) -> None:
    """``trainer_state.json``: the position, and what the numbers depend on (recipe, processes, versions)."""
    record = {
        **asdict(state),
        "config_hash": config_hash,
        "world_size": world_size,
        "versions": library_versions(),
    }
    (folder / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_state_record(
    folder: Path, *, config_hash: str, world_size: int
) -> tuple[TrainState, dict[str, Any]]:
    """The position ``trainer_state.json`` records, and the record; differences from this run are warned."""
    record = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    position = {key: record.get(key) for key in ("step", "epoch", "batch_index")}
    if not all(isinstance(value, int) and value >= 0 for value in position.values()):
        raise ValueError(f"{STATE_FILE} does not hold a position: {position}")
    _warn_on_differences(folder, record, config_hash, world_size)
    return TrainState(step=record["step"], epoch=record["epoch"], batch_index=record["batch_index"]), record


def _warn_on_differences(folder: Path, record: dict[str, Any], config_hash: str, world_size: int) -> None:
    if record.get("config_hash") != config_hash:
        log.warning(
            "checkpoint %s was written under config %s, this run's is %s: continuing (fine for a changed "
            "max_train_steps or checkpoint settings; other changes alter the run)",
            folder.name,
            record.get("config_hash"),
            config_hash,
        )
    if record.get("world_size", 1) != world_size:
        log.warning(
            "checkpoint %s was written by %s processes, this run has %d: the data order will differ",
            folder.name,
            record.get("world_size"),
            world_size,
        )
    now = library_versions()
    changed = {k: (v, now.get(k)) for k, v in record.get("versions", {}).items() if now.get(k) != v}
    if changed:
        log.warning(
            "library versions changed since checkpoint %s: %s; not bit-identical", folder.name, changed
        )


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_restorer(state: dict[str, Any]) -> Callable[[], None]:
    """Check ``state`` on scratch generators (a damaged one raises here, before anything changed); return
    what puts it into the process's generators."""
    version, internal, gauss = state["python"]
    python_state = (version, tuple(internal), gauss)
    random.Random().setstate(python_state)
    kind, keys, position, has_gauss, cached = state["numpy"]
    numpy_state = (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    np.random.RandomState().set_state(numpy_state)
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda") if torch.cuda.is_available() else None

    def restore() -> None:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(state["torch"])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore
