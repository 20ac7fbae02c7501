"""``GroupOffload``: the hooks that onload each group when the forward or backward pass reaches it and
offload it once the pass is past it (the package docstring says how and why)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from job.model.offload.groups import GroupState, OffloadGroup, Slot, plan_groups
from job.model.offload.store import DiskReport, DiskStore, HostStore
from job.model.offload.tensors import OffloadedTensor, flatten_tensor, rebuild_tensor

if TYPE_CHECKING:
    from job.model.offload.settings import OffloadSettings

log = logging.getLogger("lokr")


class GroupOffload:
    """Group offload installed on one model (see the package docstring for how and why).

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
        self.groups = plan_groups(model, settings.offload_type, settings.blocks_per_group)
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


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.detach().to("cpu").contiguous()
    return host.pin_memory() if pin else host
