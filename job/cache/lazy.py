"""A model loaded on first use, so a warm with nothing to encode never loads it (nor imports torch)."""

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LazyModel(Generic[T]):
    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._value: T | None = None
        self.loaded = False

    def get(self) -> T:
        if self._value is None:
            self._value = self._load()
            self.loaded = True
        return self._value

    @property
    def held(self) -> bool:
        """Whether the model is loaded now (``loaded``: whether it ever was)."""
        return self._value is not None

    def release(self) -> None:
        self._value = None
        if self.loaded:
            import torch  # imported by the load already; a model never loaded leaves torch unimported

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
