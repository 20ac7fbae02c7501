"""The on-disk cache format: one safetensors file per entry, named by its content key, and one index.

Entries live at ``<cache dir>/<key[:2]>/<key>.safetensors`` (two-character fan-out keeps folders small)
and are written atomically by ``job.cache.entries`` (which needs torch; this module does not).
``index.json`` lists the keys present, so "is everything cached?" is one read, not one ``stat`` per entry.
A key is added to the index only after its file is in place; a file whose key is missing from the index
(a warm killed before saving it, or a latent training encoded on demand) is adopted by ``lacking``.
"""

import logging
from pathlib import Path
from typing import Any

from job.files import read_json, write_json_atomic

log = logging.getLogger("lokr")

INDEX_NAME = "index.json"
_INDEX_VERSION = 1


def entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.safetensors"


class CacheIndex:
    """The keys present in one cache folder, each with a small description (for people, not code)."""

    def __init__(self, cache_dir: Path, entries: dict[str, Any]) -> None:
        self.cache_dir = cache_dir
        self.entries = entries
        self._dirty = False
        self.added = 0  # entries indexed since loading: written, or adopted from disk
        self.adopted = 0  # files found on disk without an index entry (training's on-demand latents, say)

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

    def add(self, key: str, description: Any) -> None:
        self.entries[key] = description
        self._dirty = True
        self.added += 1

    def lacking(self, wanted: dict[str, Any]) -> list[str]:
        """The keys of ``wanted`` (key → description) neither indexed nor on disk, in order; a file on disk
        whose key the index lacks is indexed now."""
        still_missing = []
        for key, description in wanted.items():
            if key in self.entries:
                continue
            if entry_path(self.cache_dir, key).is_file():
                self.add(key, description)
                self.adopted += 1
            else:
                still_missing.append(key)
        return still_missing

    def save(self) -> None:
        if self._dirty:
            write_json_atomic(
                self.cache_dir / INDEX_NAME, {"version": _INDEX_VERSION, "entries": self.entries}
            )
            self._dirty = False
