"""Offload groups: which frozen parameters and buffers move together, planned from the model's block lists."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

import torch

from job.model.offload.tensors import TensorLayout, flatten_tensor


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


def plan_groups(model: torch.nn.Module, offload_type: str, blocks_per_group: int) -> list[OffloadGroup]:
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
