"""The on-disk cache format: one safetensors file per entry, named by its content key, and one index.

Entries live at ``<cache dir>/<key[:2]>/<key>.safetensors`` (two-character fan-out keeps folders small)
and are written atomically. ``index.json`` lists the keys present, so "is everything cached?" is one read,
not one ``stat`` per entry. A key is added to the index only after its file is in place; a file whose key
is missing from the index (a warm killed before saving it) is adopted by ``adopt_existing``.
"""

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# safetensors' save_file reaches numpy.ctypeslib through numpy's lazy module __getattr__. When writer
# threads do that first at the same time, one can see the submodule in sys.modules before numpy has it as
# an attribute and re-enter __getattr__ until RecursionError. Importing it here, on the main thread before
# any writer pool starts, resolves the attribute once for every thread.
import numpy.ctypeslib  # noqa: F401
import torch
from safetensors.torch import load_file, save_file

from job.files import read_json, write_atomic, write_json_atomic

log = logging.getLogger("lokr")

INDEX_NAME = "index.json"
_INDEX_VERSION = 1


def entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.safetensors"


def save_entry(cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    write_atomic(entry_path(cache_dir, key), lambda temporary: save_file(contiguous, temporary, metadata))


def load_entry(cache_dir: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(entry_path(cache_dir, key))


class CacheIndex:
    """The keys present in one cache folder, each with a small description (for people, not code)."""

    def __init__(self, cache_dir: Path, entries: dict[str, Any]) -> None:
        self.cache_dir = cache_dir
        self.entries = entries
        self._dirty = False

    @classmethod
    def load(cls, cache_dir: Path) -> "CacheIndex":
        stored = read_json(cache_dir / INDEX_NAME)
        if stored is None:
            return cls(cache_dir, {})
        if not isinstance(stored, dict) or stored.get("version") != _INDEX_VERSION:
            log.warning(
                "cache index %s is unreadable; its entries will be checked again", cache_dir / INDEX_NAME
            )
            return cls(cache_dir, {})
        return cls(cache_dir, dict(stored.get("entries") or {}))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the index, each once, in first-seen order."""
        return [key for key in dict.fromkeys(keys) if key not in self.entries]

    def add(self, key: str, description: Any) -> None:
        self.entries[key] = description
        self._dirty = True

    def adopt_existing(self, wanted: dict[str, Any]) -> list[str]:
        """Index the files already on disk among ``wanted`` (key → description); return the rest."""
        still_missing = []
        for key, description in wanted.items():
            if entry_path(self.cache_dir, key).is_file():
                self.add(key, description)
            else:
                still_missing.append(key)
        return still_missing

    def save(self) -> None:
        if self._dirty:
            write_json_atomic(
                self.cache_dir / INDEX_NAME, {"version": _INDEX_VERSION, "entries": self.entries}
            )
            self._dirty = False
