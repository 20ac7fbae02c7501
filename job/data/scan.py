"""Scanning a dataset folder into samples (image, captions, transform) and skipped files (with reasons).

Reading and hashing every image is the expensive part, so what was learnt about each file (content hash
and upright size, or why it is unreadable) is remembered in a probe file keyed by path, size and mtime;
an unchanged file is never opened again. Probing runs on a thread pool (Pillow decodes without the GIL).
With ``trust_last_scan`` (SimpleTuner's ``skip_file_discovery`` aspect/metadata) the probe file is also
the file list: the folder is not walked, and only captions are read.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config.backends import DatasetConfig
from job.data.captions import CaptionProblem, captions_for
from job.data.discovery import FoundImage, find_images
from job.data.geometry import ModelGeometry, is_smaller_than
from job.data.transform import Transform, TransformPlanner
from job.files import read_json, write_json_atomic

_PROBE_VERSION = 1


@dataclass(frozen=True)
class Sample:
    relpath: str
    sha256: str
    captions: tuple[str, ...]
    transform: Transform
    size: tuple[int, int]  # (width, height) upright, before the transform


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class ScanResult:
    images_found: int
    samples: list[Sample]
    skipped: list[Skipped]
    probed: int  # files opened this time (new or changed since the last scan)


def scan_dataset(
    dataset: DatasetConfig,
    root: Path,
    geometry: ModelGeometry,
    *,
    seed: int,
    aspect_rounding: int | None,
    probe_path: Path,
    workers: int | None = None,
    trust_last_scan: bool = False,
) -> ScanResult:
    """Every image under ``root`` as a sample, or as skipped with the reason."""
    # With no earlier scan there is nothing to trust: the folder is walked as usual.
    found = (trust_last_scan and _last_scan(probe_path)) or find_images(root)
    probes, probed = probe_files(root, found, probe_path, workers)
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    planner = TransformPlanner(dataset, geometry, seed=seed, aspect_rounding=aspect_rounding)
    for image in found:
        probe = probes[image.relpath]
        reason = probe.get("error") or _size_problem(probe["width"], probe["height"], dataset)
        if reason:
            skipped.append(Skipped(image.relpath, reason))
            continue
        try:
            captions = captions_for(os.path.join(root, image.relpath), dataset)
        except CaptionProblem as problem:
            skipped.append(Skipped(image.relpath, str(problem)))
            continue
        transform = planner.plan(probe["width"], probe["height"], probe["sha256"])
        size = (probe["width"], probe["height"])
        samples.append(Sample(image.relpath, probe["sha256"], captions, transform, size))
    return ScanResult(len(found), samples, skipped, probed)


def _size_problem(width: int, height: int, dataset: DatasetConfig) -> str | None:
    minimum, resolution_type = dataset.minimum_image_size, dataset.resolution_type
    assert resolution_type is not None  # filled by the loader
    if not minimum or not is_smaller_than(width, height, minimum, resolution_type):
        return None
    limit = {
        "pixel": f"a shorter side of {minimum:g} px",
        "pixel_area": f"an area of {minimum:g}x{minimum:g} px",
        "area": f"{minimum:g} megapixels",
    }[resolution_type]
    return f"too small: {width}x{height} is under minimum_image_size ({limit})"


def probe_files(
    root: Path, found: list[FoundImage], probe_path: Path, workers: int | None = None
) -> tuple[dict[str, dict[str, Any]], int]:
    """Each file's probe record (``sha256``, upright ``width`` and ``height``, or an ``error``), reusing
    remembered ones whose size and mtime have not changed; how many files were opened."""
    remembered = _load_probes(probe_path)
    probes: dict[str, dict[str, Any]] = {}
    stale: list[FoundImage] = []
    for image in found:
        record = remembered.get(image.relpath)
        if record and record["size"] == image.size and record["mtime_ns"] == image.mtime_ns:
            probes[image.relpath] = record
        else:
            stale.append(image)
    if stale:
        # Pillow and numpy are first imported here, on one thread: numpy's lazy submodule imports race
        # when the workers below start them at once (tests/test_cache_thread_imports.py).
        import job.data.images  # noqa: F401

        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for image, record in zip(stale, pool.map(lambda i: _probe(root, i), stale), strict=True):
                probes[image.relpath] = record
    if stale or len(probes) != len(remembered):
        write_json_atomic(probe_path, {"version": _PROBE_VERSION, "files": probes})
    return probes, len(stale)


def _probe(root: Path, image: FoundImage) -> dict[str, Any]:
    # Here, not at the top: Pillow and numpy cost a cached warm, which opens no image, a tenth of a second.
    from job.data.images import UnreadableImage, probe_image

    record: dict[str, Any] = {"size": image.size, "mtime_ns": image.mtime_ns}
    try:
        info = probe_image(root / image.relpath)
    except UnreadableImage as problem:
        record["error"] = str(problem)
        return record
    record.update(sha256=info.sha256, width=info.width, height=info.height)
    return record


def _last_scan(probe_path: Path) -> list[FoundImage]:
    """The files the last scan found, as it found them (sorted by path, as a walk returns them)."""
    return [
        FoundImage(relpath, record["size"], record["mtime_ns"])
        for relpath, record in sorted(_load_probes(probe_path).items())
    ]


def _load_probes(probe_path: Path) -> dict[str, dict[str, Any]]:
    stored = read_json(probe_path)
    if not isinstance(stored, dict) or stored.get("version") != _PROBE_VERSION:
        return {}
    return stored.get("files") or {}
