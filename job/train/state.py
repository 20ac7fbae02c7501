"""What a checkpoint holds, and putting it back: everything needed to continue bit for bit.

Layout of ``checkpoint-<step:08d>/``:

- ``lokr.safetensors``: the adapter in LyCORIS's key format (loadable as is, like the final output)
- ``ema.safetensors``: the EMA weights (``use_ema`` only)
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s (``torch.load(weights_only=True)`` reads them)
- ``rng.pt``: the Python, NumPy, torch CPU and CUDA generator states (of the main process: a step's
  own randomness comes from ``job.flow_matching.step_generator``, so these only matter to code outside
  the step)
- ``trainer_state.json``: step, data position, config hash, world size, library versions
- ``COMPLETE``: written last (see ``checkpoint.py``)
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from job.config.schema import LycorisConfig
from job.errors import ConfigError
from job.model.lokr import save_adapter

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

    from job.train.ema import AdapterEMA

log = logging.getLogger("lokr")

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "lokr.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"

# The libraries whose versions decide the numbers; a resume under others is warned about.
TRACKED_LIBRARIES = (
    "lokr-job",
    "torch",
    "diffusers",
    "lycoris-lora",
    "optimum-quanto",
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


@dataclass
class TrainingObjects:
    """The stateful parts of training that a checkpoint captures."""

    network: LycorisNetwork
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AdapterEMA | None
    lycoris: LycorisConfig


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def save_training_state(
    folder: Path, objects: TrainingObjects, state: TrainState, *, config_hash: str, world_size: int
) -> None:
    """Write the checkpoint's contents into ``folder`` (the main process does; the others hold the same)."""
    from safetensors.torch import save_file

    torch.save(_rng_state(), folder / RNG_FILE)
    save_adapter(objects.network, folder / ADAPTER_FILE, objects.lycoris)
    if objects.ema is not None:
        save_file(objects.ema.state_dict(), str(folder / EMA_FILE))
    torch.save(objects.optimizer.state_dict(), folder / OPTIMIZER_FILE)
    torch.save(objects.scheduler.state_dict(), folder / SCHEDULER_FILE)
    write_state_record(folder, state, config_hash=config_hash, world_size=world_size)


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


def load_training_state(
    folder: Path, objects: TrainingObjects, *, config_hash: str, world_size: int
) -> TrainState:
    """Restore every object from ``folder`` and return the position to continue from.

    Every file is read and checked against the objects before any object changes: a checkpoint that fails
    to load (``ConfigError`` for one this config cannot continue, anything else for damaged contents) leaves
    them as they were, for the caller to try an older one or start fresh.
    """
    from safetensors.torch import load_file

    state, record = read_state_record(folder, config_hash=config_hash, world_size=world_size)
    adapter = load_file(str(folder / ADAPTER_FILE))
    _check_adapter(objects.network, adapter, folder, same_recipe=record.get("config_hash") == config_hash)
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
    scheduler = torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True)
    if set(scheduler) != set(objects.scheduler.state_dict()):
        # load_state_dict would take any dict silently.
        raise ValueError(f"{SCHEDULER_FILE} holds {sorted(scheduler)}, not this schedule's fields")
    restore_rng = _rng_restorer(torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True))
    # The optimizer checks its groups before it changes anything: first, so its refusal changes nothing.
    objects.optimizer.load_state_dict(optimizer)
    objects.network.load_state_dict(adapter, strict=True)
    if objects.ema is not None and ema is not None:
        objects.ema.load_state_dict(ema)
    objects.scheduler.load_state_dict(scheduler)
    restore_rng()
    return state


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
