"""Group offload for training: the transformer's frozen block weights live in host RAM or in files and
visit the accelerator one group at a time, in the forward pass and again in the backward pass.

Why our own offloader rather than diffusers' ``apply_group_offloading`` (measured with diffusers 0.42.1,
optimum-quanto 0.2.7, torch 2.13, on the tiny AuraFlow with the seed's LoKr):

- int8-quanto weights: RAM mode fails with ``_apply(): Couldn't swap QLinear.weight`` and disk mode with
  ``Attempted to access the data pointer on an invalid python storage`` (safetensors cannot write quanto's
  tensor subclass). Its subclass support is hard-wired to torchao.
- Without gradient checkpointing, every weight autograd saves (``weight.t()`` views of plain weights, the
  quanto tensor itself for quanto's linear) keeps its onloaded copy alive until backward: on a GPU the whole
  model piles up in VRAM during the forward pass; a saved weight whose storage was swapped back to the host
  is the "mat2 is on cpu" in AuraFlow's backward of SimpleTuner's issue #1975.
- With gradient checkpointing, the recomputation in backward onloads each block again but stops early,
  before the hook that offloads it: after one backward 3 of the tiny model's 4 groups were left onloaded.
- Disk files are reused whenever one with the group's name exists: a different model offloaded into the
  same folder silently ran with the old model's weights (max difference 2.2 in the output).

Patching those means replacing most of its ``ModuleGroup`` and hooks, so this module is small and does
only what training needs:

- A tensor is moved as its plain leaves. Tensor subclasses that implement PyTorch's traceable-wrapper
  protocol (quanto's ``WeightQBytesTensor``/``WeightQBitsTensor``, torchao's) are flattened with
  ``__tensor_flatten__`` into their int8 data and scales, stored and copied as ordinary tensors, and
  rebuilt with ``__tensor_unflatten__`` on the accelerator. Nothing is special-cased by module or class.
- Onloading installs the rebuilt tensors as the modules' parameters and buffers; offloading installs an
  ``OffloadedTensor`` placeholder (no memory, same shape and dtype) that raises if anything computes with
  it, so a missed onload is an error naming the weight, never a silent wrong result.
- Autograd never keeps an onloaded weight: while the transformer runs forward, a ``saved_tensors_hooks``
  pair stores weights that autograd saves as a reference to their slot, and the backward pass gets the
  weight back from the slot, onloading its group if needed. (Inside checkpointed blocks PyTorch's own
  checkpoint hooks take precedence and store nothing; the recomputation onloads through the forward hook.)
- Tensor hooks on a group's outputs onload it (and prefetch the group before it) when the backward pass
  reaches it; hooks on its inputs offload it once backward has passed it; whatever is still onloaded when
  the backward pass ends is offloaded then.
- Disk files are one safetensors file per group plus ``manifest.json`` with each group's sha256 over its
  leaves: valid files are reused, stale ones rewritten, and ``warm_only`` writes them ahead of training.

Trainable tensors (LoKr's, held by the LyCORIS network outside the transformer's module tree) are never
offloaded; the transformer's own parameters outside the block lists (patch and time embeddings, caption
projection, final norm and projection: about 1% of AuraFlow) stay on the onload device. Apply group offload
after attaching LoKr, and do not move the transformer with ``.to()`` afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from job.config.schema import JobConfig
from job.errors import ConfigError
from job.files import write_atomic

log = logging.getLogger("lokr")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Hashing runs ~0.9 GB/s a thread; a few threads make checking 7 GB of int8 weights take seconds, not tens.
HASH_THREADS = min(8, os.cpu_count() or 1)


# --- tensors as plain leaves ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLayout:
    """How to rebuild one tensor from its plain leaves: ``cls`` None means the tensor is its own leaf."""

    cls: type[torch.Tensor] | None = None
    context: Any = None
    size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    inner: tuple[tuple[str, TensorLayout], ...] = ()


def flatten_tensor(tensor: torch.Tensor, key: str, leaves: dict[str, torch.Tensor]) -> TensorLayout:
    """Add ``tensor``'s plain leaves to ``leaves`` under ``key`` (``key.<inner name>…`` for subclasses)."""
    if not is_traceable_wrapper_subclass(tensor):
        leaves[key] = tensor.detach()
        return TensorLayout()
    names, context = tensor.__tensor_flatten__()
    inner = tuple((name, flatten_tensor(getattr(tensor, name), f"{key}.{name}", leaves)) for name in names)
    return TensorLayout(type(tensor), context, tuple(tensor.size()), tuple(tensor.stride()), inner)


def rebuild_tensor(layout: TensorLayout, key: str, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor ``flatten_tensor`` took apart, from leaves that may now live on another device."""
    if layout.cls is None:
        return leaves[key]
    inner = {name: rebuild_tensor(sub, f"{key}.{name}", leaves) for name, sub in layout.inner}
    return layout.cls.__tensor_unflatten__(inner, layout.context, layout.size, layout.stride)


class OffloadedTensor(torch.Tensor):
    """Stands in for an offloaded weight: right shape and dtype, no memory, and an error if used."""

    slot_key: str

    @staticmethod
    def __new__(cls, like: torch.Tensor, slot_key: str) -> OffloadedTensor:
        placeholder = torch.Tensor._make_wrapper_subclass(
            cls, like.size(), strides=like.stride(), dtype=like.dtype, device="meta", requires_grad=False
        )
        placeholder.slot_key = slot_key
        return placeholder

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            # nn.Parameter(placeholder) detaches it.
            return OffloadedTensor(args[0], args[0].slot_key)
        leaves, _ = tree_flatten((args, kwargs))
        names = ", ".join(leaf.slot_key for leaf in leaves if isinstance(leaf, OffloadedTensor))
        raise RuntimeError(
            f"{names} is offloaded by group offload and only the transformer's forward and backward can use "
            f"it ({func}): do not move the transformer or use its block weights directly once offloaded"
        )

    def __repr__(self) -> str:  # the default repr would compute with the tensor
        return f"OffloadedTensor({self.slot_key}, shape={tuple(self.shape)}, dtype={self.dtype})"


@dataclass(eq=False)
class Slot:
    """One frozen parameter or buffer that moves with its group."""

    module: torch.nn.Module
    name: str
    key: str
    is_buffer: bool
    layout: TensorLayout
    group: OffloadGroup | None = None

    def current(self) -> torch.Tensor:
        table = self.module._buffers if self.is_buffer else self.module._parameters
        return table[self.name]

    def install(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_buffer:
            self.module._buffers[self.name] = tensor
        else:
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
            self.module._parameters[self.name] = tensor
        return tensor


class GroupState(Enum):
    OFFLOADED = "offloaded"
    LOADING = "loading"
    RESIDENT = "resident"


@dataclass(eq=False)
class OffloadGroup:
    """Modules whose frozen tensors are onloaded and offloaded together."""

    index: int
    name: str
    modules: list[torch.nn.Module]
    slots: list[Slot]
    nbytes: int = 0
    state: GroupState = GroupState.OFFLOADED
    pending: Future | None = None

    def __post_init__(self) -> None:
        for slot in self.slots:
            slot.group = self

    @property
    def file_name(self) -> str:
        return f"{self.name}.safetensors"


# --- where offloaded tensors live ------------------------------------------------------------------------


class HostStore:
    """Offloaded leaves in host RAM."""

    def __init__(self) -> None:
        self.leaves: dict[int, dict[str, torch.Tensor]] = {}

    def put(self, group: OffloadGroup, leaves: dict[str, torch.Tensor]) -> None:
        self.leaves[group.index] = leaves

    def read(self, group: OffloadGroup) -> dict[str, torch.Tensor]:
        return self.leaves[group.index]


@dataclass
class DiskReport:
    """What preparing the offload folder did: groups whose files were written, and those reused."""

    directory: Path
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class DiskStore:
    """Offloaded leaves in one safetensors file per group, described by ``manifest.json``.

    The manifest maps each group to its file, size and the sha256 of its leaves (names, dtypes, shapes,
    bytes); a file is reused only when the weights hash the same, so a changed base model, precision or
    grouping rewrites exactly the groups that changed.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.report = DiskReport(directory)

    def prepare(self, groups: list[OffloadGroup], host_leaves: Callable[[OffloadGroup], dict]) -> None:
        """Write or validate every group's file, then the manifest (last, so it only names whole files)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        old = self._read_manifest()
        entries: dict[str, dict[str, Any]] = {}
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="offload-hash") as pool:
            # host_leaves runs here, one group at a time; hashing and writing run HASH_THREADS groups at
            # once. The window bounds host memory to a few groups' worth of copies.
            window: list[tuple[OffloadGroup, Future]] = []
            for group in groups:
                window.append((group, pool.submit(self._store_group, group, host_leaves(group), old)))
                if len(window) >= HASH_THREADS:
                    self._collect(window.pop(0), entries)
            for item in window:
                self._collect(item, entries)
        for name, entry in old.items():
            if name not in entries and (self.directory / entry["file"]).exists():
                (self.directory / entry["file"]).unlink()
                self.report.removed.append(name)
        if entries != old:
            _write_json_atomic(self.directory / MANIFEST, {"format": MANIFEST_FORMAT, "groups": entries})

    def read(self, group: OffloadGroup) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.directory / group.file_name, device="cpu")

    def _collect(self, item: tuple[OffloadGroup, Future], entries: dict[str, dict[str, Any]]) -> None:
        group, future = item
        entry, written = future.result()
        entries[group.name] = entry
        (self.report.written if written else self.report.reused).append(group.name)

    def _store_group(
        self, group: OffloadGroup, host: dict[str, torch.Tensor], old: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        from safetensors.torch import save_file

        digest = _leaves_digest(host)
        path = self.directory / group.file_name
        previous = old.get(group.name)
        if (
            previous is not None
            and previous.get("sha256") == digest
            and path.is_file()
            and path.stat().st_size == previous.get("bytes")
        ):
            return previous, False
        write_atomic(path, lambda tmp: save_file(host, str(tmp)))  # not save_file's 0600
        return {"file": path.name, "sha256": digest, "bytes": path.stat().st_size}, True

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return {}
        groups = manifest.get("groups")
        return groups if isinstance(groups, dict) else {}


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.detach().to("cpu").contiguous()
    return host.pin_memory() if pin else host


def _leaves_digest(leaves: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(leaves):
        tensor = leaves[key]
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- the offloader ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadSettings:
    """The config's group-offload flags, resolved for one onload device."""

    offload_type: Literal["block_level", "leaf_level"]
    blocks_per_group: int
    use_stream: bool
    disk_dir: Path | None


def offload_settings(job: JobConfig, offload_dir: Path, onload_device: torch.device) -> OffloadSettings:
    """Resolve the flags. Streams are silently off unless the onload device is CUDA (as the seed says);
    disk files go to ``group_offload_to_disk_path`` (a relative path lives under ``offload_dir``, the work
    directory's ``offload/``); without that key, offloaded weights stay in host RAM."""
    use_stream = job.group_offload_use_stream and torch.device(onload_device).type == "cuda"
    if job.group_offload_use_stream and not use_stream:
        log.info("group offload: streams need a CUDA onload device; continuing without them")
    disk_dir = None
    if job.group_offload_to_disk_path:
        disk_dir = Path(job.group_offload_to_disk_path).expanduser()
        if not disk_dir.is_absolute():
            disk_dir = Path(offload_dir) / disk_dir
    return OffloadSettings(job.group_offload_type, job.group_offload_blocks_per_group, use_stream, disk_dir)


def apply_group_offload(
    transformer: torch.nn.Module,
    job: JobConfig,
    offload_dir: Path,
    onload_device: torch.device | str,
    *,
    warm_only: bool = False,
) -> GroupOffload | None:
    """Group-offload ``transformer``'s frozen block weights as ``job`` says; None when it is not enabled.

    Call after the base model is cast/quantized and LoKr is attached, with the transformer anywhere (the
    weights are moved group by group, never all at once). ``warm_only`` writes or validates the disk files
    and leaves the transformer untouched, so ``lokr-job warm`` pays for them instead of training.
    """
    if not job.enable_group_offload:
        return None
    if job.model_type == "full":
        raise ConfigError(
            "enable_group_offload offloads the frozen base weights a LoKr adapter trains against; with "
            "model_type full every weight trains: use deepspeed_config (ZeRO-3 with offload) instead"
        )
    onload_device = torch.device(onload_device)
    settings = offload_settings(job, Path(offload_dir), onload_device)
    return GroupOffload(
        transformer, onload_device, settings, prefetch=settings.use_stream, install=not warm_only
    )


class GroupOffload:
    """Group offload installed on one model (see the module docstring for how and why).

    ``prefetch`` loads the next group (the previous one in backward) on a worker thread while the current
    one computes; on CUDA the copy runs on a side stream. Off the GPU it exercises the same bookkeeping.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        onload_device: torch.device,
        settings: OffloadSettings,
        *,
        prefetch: bool = False,
        install: bool = True,
    ):
        self.model = model
        self.onload_device = onload_device
        self.settings = settings
        self.groups = _plan_groups(model, settings.offload_type, settings.blocks_per_group)
        self.stats = OffloadStats()
        self._lock = threading.RLock()
        self._order: list[OffloadGroup] = []
        self._position: dict[OffloadGroup, int] = {}
        self._order_known = False
        self._slot_of: dict[int, Slot] = {}
        self._callback_tasks: set[int] = set()
        self._saved_hooks: list[torch.autograd.graph.saved_tensors_hooks] = []
        self._stream = torch.cuda.Stream(onload_device) if prefetch and onload_device.type == "cuda" else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="offload-prefetch") if prefetch else None

        self.store: HostStore | DiskStore
        self.disk: DiskReport | None = None
        if settings.disk_dir is not None:
            self.store = DiskStore(settings.disk_dir)
            self.store.prepare(self.groups, partial(self._host_leaves, False))
            self.disk = self.store.report
            written, reused = len(self.disk.written), len(self.disk.reused)
            log.info("group offload: %s: %d files written, %d reused", settings.disk_dir, written, reused)
        else:
            self.store = HostStore()
        self.installed = install
        if install:
            self._install()

    def close(self) -> None:
        """Stop the prefetch worker (the model keeps working, without prefetch)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    # Setup.

    def _host_leaves(self, pin: bool, group: OffloadGroup) -> dict[str, torch.Tensor]:
        """The group's leaves in host memory, in the form they take on the onload device (quanto picks
        device-specific packings for int4): each tensor visits the device first, one at a time."""
        leaves: dict[str, torch.Tensor] = {}
        for slot in group.slots:
            tensor = slot.current()
            if tensor.device != self.onload_device:
                tensor = tensor.to(self.onload_device)
            slot.layout = flatten_tensor(tensor, slot.key, leaves)
        group.nbytes = sum(t.numel() * t.element_size() for t in leaves.values())
        return {key: _host_copy(value, pin) for key, value in leaves.items()}

    def _install(self) -> None:
        # Pinned host memory makes the copies asynchronous; it needs a CUDA onload device.
        pin = self.onload_device.type == "cuda"
        for group in self.groups:
            if isinstance(self.store, HostStore):
                self.store.put(group, self._host_leaves(pin, group))
            self._offload(group)
        _move_residents(self.model, self.groups, self.onload_device)
        self._install_hooks()
        log.info(
            "group offload: %d %s groups (%.2f GB) offloaded to %s, streams %s",
            len(self.groups),
            self.settings.offload_type,
            sum(g.nbytes for g in self.groups) / 1e9,
            self.settings.disk_dir or "host RAM",
            "on" if self._stream is not None else "off",
        )

    def _install_hooks(self) -> None:
        for group in self.groups:
            first, last = group.modules[0], group.modules[-1]
            first.register_forward_pre_hook(partial(self._before_forward, group), with_kwargs=True)
            last.register_forward_hook(partial(self._after_forward, group))
        self.model.register_forward_pre_hook(self._model_pre_forward)
        self.model.register_forward_hook(self._model_post_forward, always_call=True)

    # Forward.

    def _model_pre_forward(self, module: torch.nn.Module, args: tuple) -> None:
        self._offload_all()  # a forward that raised may have left groups onloaded
        if self._order_known and self._order:
            self._prefetch(self._order[0])
        if torch.is_grad_enabled():
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            hooks.__enter__()
            self._saved_hooks.append(hooks)

    def _model_post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._saved_hooks:
            self._saved_hooks.pop().__exit__(None, None, None)
        self._order_known = True

    def _before_forward(
        self, group: OffloadGroup, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> None:
        self._ensure_resident(group)
        if _in_backward():
            return  # checkpoint recomputation: the backward hooks own this group's residency
        if not self._order_known and group not in self._position:
            self._position[group] = len(self._order)
            self._order.append(group)
        self._prefetch(self._neighbour(group, +1))
        if torch.is_grad_enabled():
            for tensor in _grad_tensors((args, kwargs)):
                tensor.register_hook(partial(self._after_backward, group))

    def _after_forward(self, group: OffloadGroup, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if _in_backward():
            return
        if torch.is_grad_enabled():
            for tensor in _grad_tensors(output):
                tensor.register_hook(partial(self._before_backward, group))
        self._offload(group)

    # Backward.

    def _before_backward(self, group: OffloadGroup, grad: torch.Tensor | None = None) -> None:
        # Backward runs the groups in reverse: the one after this in forward order is done by now (if not,
        # a saved weight it needs is onloaded again on unpack), and the one before it comes next.
        later = self._neighbour(group, +1)
        if later is not None:
            self._offload(later)
        self._ensure_resident(group)
        self._prefetch(self._neighbour(group, -1))
        task = torch._C._current_graph_task_id()
        with self._lock:
            if task not in self._callback_tasks:
                self._callback_tasks.add(task)
                torch.autograd.Variable._execution_engine.queue_callback(partial(self._end_of_backward, task))

    def _after_backward(self, group: OffloadGroup, grad: torch.Tensor | None = None) -> None:
        self._offload(group)

    def _end_of_backward(self, task: int) -> None:
        with self._lock:
            self._callback_tasks.discard(task)
        self._offload_all()

    def _pack(self, tensor: torch.Tensor) -> Any:
        slot = self._slot_of.get(id(tensor))
        if slot is not None:
            return _SavedWeight(slot, None)
        base = tensor._base
        slot = self._slot_of.get(id(base)) if base is not None else None
        if slot is None:
            return tensor
        return _SavedWeight(slot, (tensor.size(), tensor.stride(), tensor.storage_offset()))

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedWeight):
            return saved
        self._ensure_resident(saved.slot.group)
        weight = saved.slot.current()
        return weight if saved.view is None else weight.as_strided(*saved.view)

    # Moving groups.

    def _neighbour(self, group: OffloadGroup, step: int) -> OffloadGroup | None:
        position = self._position.get(group)
        if position is None or not 0 <= position + step < len(self._order):
            return None
        return self._order[position + step]

    def _prefetch(self, group: OffloadGroup | None) -> None:
        if group is None or self._worker is None:
            return
        with self._lock:
            if group.state is GroupState.OFFLOADED:
                group.pending = self._worker.submit(self._load, group, True)
                group.state = GroupState.LOADING

    def _ensure_resident(self, group: OffloadGroup) -> None:
        with self._lock:
            if group.state is GroupState.RESIDENT:
                return
            if group.state is GroupState.LOADING:
                leaves, event = group.pending.result()
                group.pending = None
                self.stats.prefetched += 1
                if event is not None:
                    current = torch.cuda.current_stream(self.onload_device)
                    current.wait_event(event)
                    for leaf in leaves.values():
                        # Allocated on the side stream, used on this one: keep it alive until this one is done.
                        leaf.record_stream(current)
            else:
                leaves, _ = self._load(group, False)
            for slot in group.slots:
                installed = slot.install(rebuild_tensor(slot.layout, slot.key, leaves))
                self._slot_of[id(installed)] = slot
            group.state = GroupState.RESIDENT
            self.stats.onloaded(group, self.groups)

    def _load(
        self, group: OffloadGroup, side_stream: bool
    ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """The group's leaves on the onload device: copied on the current stream, or (prefetch, on the
        worker thread) on the side stream with an event that says when they are there."""
        host = self.store.read(group)
        if not side_stream or self._stream is None:
            return {key: _onload_copy(value, self.onload_device) for key, value in host.items()}, None
        with torch.cuda.stream(self._stream):
            leaves = {key: value.to(self.onload_device, non_blocking=True) for key, value in host.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return leaves, event

    def _offload(self, group: OffloadGroup) -> None:
        with self._lock:
            if group.state is GroupState.LOADING:
                group.pending.result()
                group.pending = None
                self.stats.prefetches_dropped += 1
            elif group.state is GroupState.RESIDENT:
                for slot in group.slots:
                    self._slot_of.pop(id(slot.current()), None)
                self.stats.offloads += 1
            for slot in group.slots:
                slot.install(OffloadedTensor(slot.current(), slot.key))
            group.state = GroupState.OFFLOADED

    def _offload_all(self) -> None:
        for group in self.groups:
            if group.state is not GroupState.OFFLOADED:
                self._offload(group)


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps for a saved weight: its slot, and the view of it that was saved."""

    slot: Slot
    view: tuple[torch.Size, tuple[int, ...], int] | None


@dataclass
class OffloadStats:
    """Counters for tests and benchmarks: how often groups moved and how much was onloaded at once."""

    onloads: int = 0
    offloads: int = 0
    prefetched: int = 0  # onloads a prefetch had already started
    prefetches_dropped: int = 0  # prefetched groups offloaded before use
    peak_resident_groups: int = 0
    peak_resident_bytes: int = 0

    def onloaded(self, group: OffloadGroup, groups: list[OffloadGroup]) -> None:
        self.onloads += 1
        resident = [g for g in groups if g.state is GroupState.RESIDENT]
        self.peak_resident_groups = max(self.peak_resident_groups, len(resident))
        self.peak_resident_bytes = max(self.peak_resident_bytes, sum(g.nbytes for g in resident))


def _plan_groups(model: torch.nn.Module, offload_type: str, blocks_per_group: int) -> list[OffloadGroup]:
    """Block level: runs of ``blocks_per_group`` blocks of each of the model's block lists. Leaf level: each
    module inside those blocks that holds frozen tensors of its own."""
    groups: list[OffloadGroup] = []
    for list_name, blocks in model.named_children():
        if not isinstance(blocks, torch.nn.ModuleList | torch.nn.Sequential):
            continue
        if offload_type == "block_level":
            for start in range(0, len(blocks), blocks_per_group):
                members = list(blocks[start : start + blocks_per_group])
                end = start + len(members) - 1
                name = f"{list_name}.{start}" if start == end else f"{list_name}.{start}-{end}"
                slots = [
                    s for i, b in enumerate(members) for s in _slots(b, f"{list_name}.{start + i}", True)
                ]
                if slots:
                    groups.append(OffloadGroup(len(groups), name, members, slots))
        else:
            for name, module in blocks.named_modules(prefix=list_name):
                slots = list(_slots(module, name, recurse=False))
                if slots:
                    groups.append(OffloadGroup(len(groups), name, [module], slots))
    return groups


def _slots(module: torch.nn.Module, prefix: str, recurse: bool) -> Iterator[Slot]:
    modules = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
    for name, owner in modules:
        for table, is_buffer in ((owner._parameters, False), (owner._buffers, True)):
            for tensor_name, tensor in table.items():
                # Trainable tensors never move: their gradients and optimizer state live on the device.
                if tensor is not None and not tensor.requires_grad:
                    flat: dict[str, torch.Tensor] = {}
                    layout = flatten_tensor(tensor, f"{name}.{tensor_name}", flat)
                    yield Slot(owner, tensor_name, f"{name}.{tensor_name}", is_buffer, layout)


def _move_residents(model: torch.nn.Module, groups: list[OffloadGroup], device: torch.device) -> None:
    """Put every tensor that no group moves on the onload device, one at a time."""
    offloaded = {(id(slot.module), slot.name) for group in groups for slot in group.slots}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or (id(module), name) in offloaded or tensor.device == device:
                    continue
                moved = tensor.detach().to(device)
                if isinstance(tensor, torch.nn.Parameter):
                    moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                table[name] = moved


def _onload_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return tensor.to(device)
    # safetensors hands back slices of one buffer at arbitrary offsets, and CPU kernels want aligned data
    # (measured: torch._weight_int8pack_mm, quanto's int8 matmul on CPU, segfaults on such a weight).
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def _grad_tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed block recomputing its forward)."""
    return torch._C._current_graph_task_id() != -1
