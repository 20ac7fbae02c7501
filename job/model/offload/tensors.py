"""Tensors as plain leaves: how a (possibly subclassed) tensor is taken apart for moving and rebuilt, and
the placeholder an offloaded weight leaves behind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


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
