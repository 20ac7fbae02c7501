"""Where offloaded leaves live between visits: host RAM, or one safetensors file per group on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from job.files import write_atomic, write_bytes_atomic
from job.model.offload.groups import OffloadGroup

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Hashing runs ~0.9 GB/s a thread; a few threads make checking 7 GB of int8 weights take seconds, not tens.
HASH_THREADS = min(8, os.cpu_count() or 1)


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
            manifest = {"format": MANIFEST_FORMAT, "groups": entries}
            write_bytes_atomic(
                self.directory / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
            )

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


def _leaves_digest(leaves: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(leaves):
        tensor = leaves[key]
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
