"""The dataset census of ``lokr-job check``: images, captions, buckets, and what will be skipped and why.

A dataset on this machine (local, or already fetched) is scanned with warm's own code (``scan_dataset``,
``plan_buckets``), so the census says exactly what warm will do; nothing is encoded. The probe file that
remembers image sizes is read from the work directory when there is one but written only to a temporary
folder: check leaves the work directory as it found it. A remote dataset not fetched yet is counted from
its listing (images and caption files); its sizes, and so its buckets, are known after ``lokr-job fetch``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from job.cache import layout
from job.config.backends import DatasetConfig
from job.context import JobContext
from job.data.buckets import StepShape, dropped_lines, padded_lines, plan_buckets, require_usable
from job.data.discovery import IMAGE_EXTENSIONS, trusts_last_scan
from job.data.geometry import ModelGeometry
from job.data.location import is_fetched, local_data_dir
from job.data.masks import match_masks
from job.data.sampler import SamplerDataset
from job.data.scan import Sample, scan_dataset
from job.errors import DataError

_SHOWN_SKIPS = 5


@dataclass
class DatasetCensus:
    id: str
    source: str
    role: str  # "training" or "regularisation"
    repeats: int
    scanned: bool  # False: counted from a remote listing; sizes unknown until fetched
    images: int = 0
    usable: int = 0  # in the buckets training uses, before repeats
    captions: int = 0  # distinct captions of the usable images
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)  # reason → files
    skipped_examples: list[str] = field(default_factory=list)  # "path: reason", the first few
    dropped: list[str] = field(default_factory=list)  # buckets too small for a step
    padded: list[str] = field(default_factory=list)  # small buckets kept by repeating their images
    padded_samples: dict[tuple[int, int], int] = field(default_factory=dict)  # their samples an epoch
    problem: str | None = None  # why the dataset cannot train (exit 3)
    caption_texts: set[str] = field(default_factory=set, repr=False)

    def sampler_dataset(self) -> SamplerDataset:
        """For counting batches an epoch exactly as training does (sample ids do not matter)."""
        return SamplerDataset(
            self.id,
            {size: np.arange(count) for size, count in self.buckets.items()},
            self.repeats,
            self.padded_samples,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "source": self.source,
            "role": self.role,
            "repeats": self.repeats,
            "scanned": self.scanned,
            "images": self.images,
            "usable": self.usable,
            "captions": self.captions,
            "buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.items()},
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            "dropped_buckets": self.dropped,
            "padded_buckets": self.padded,
            "problem": self.problem,
        }


def census(
    ctx: JobContext,
    dataset: DatasetConfig,
    geometry: ModelGeometry,
    step: StepShape,
    *,
    listing: list[str] | None,
) -> DatasetCensus:
    """One dataset's census; ``listing`` is its remote object keys when it is remote and not fetched."""
    root = local_data_dir(dataset, ctx.workdir)
    result = DatasetCensus(
        dataset.id,
        dataset.instance_data_dir or dataset.dataset_name or f"s3://{dataset.aws_bucket_name}",
        "regularisation" if dataset.is_regularisation_data else "training",
        dataset.repeats,
        scanned=root.is_dir(),
    )
    if root.is_dir():
        _scan(ctx, dataset, root, geometry, step, result)
    elif listing is not None:
        _count_listing(dataset, listing, result)
    else:
        result.problem = f"dataset {dataset.id!r}: {root} is not a folder"
    return result


def _scan(
    ctx: JobContext,
    dataset: DatasetConfig,
    root: Path,
    geometry: ModelGeometry,
    step: StepShape,
    result: DatasetCensus,
) -> None:
    job = ctx.config.job
    with _scratch_copy(layout.probe_path(ctx.workdir, dataset.id)) as probe_path:
        scan = scan_dataset(
            dataset,
            root,
            geometry,
            seed=job.seed,
            aspect_rounding=job.aspect_bucket_rounding,
            probe_path=probe_path,
            trust_last_scan=trusts_last_scan(job, dataset),
        )
    result.images = scan.images_found
    result.skipped = Counter(s.reason.split(":")[0] for s in scan.skipped)
    result.skipped_examples = [f"{s.relpath}: {s.reason}" for s in scan.skipped[:_SHOWN_SKIPS]]
    if not scan.samples:
        what = "no images" if not scan.images_found else f"none of its {scan.images_found} images is usable"
        result.problem = f"dataset {dataset.id!r}: {what} under {root}"
        return
    buckets = plan_buckets([s.transform.bucket for s in scan.samples], repeats=dataset.repeats, step=step)
    result.dropped = dropped_lines(dataset.id, buckets, repeats=dataset.repeats, step=step)
    result.padded = padded_lines(dataset.id, buckets, repeats=dataset.repeats, step=step)
    result.padded_samples = buckets.padded
    result.buckets = {size: len(members) for size, members in buckets.usable.items()}
    result.usable = sum(result.buckets.values())
    result.caption_texts = {
        caption
        for members in buckets.usable.values()
        for i in members
        for caption in scan.samples[i].captions
    }
    result.captions = len(result.caption_texts)
    try:
        require_usable(dataset.id, buckets, images=len(scan.samples), repeats=dataset.repeats, step=step)
    except DataError as exc:
        result.problem = exc.message
    else:
        result.problem = _mask_problem(ctx, dataset, scan.samples)


def _mask_problem(ctx: JobContext, dataset: DatasetConfig, samples: list[Sample]) -> str | None:
    """Why the dataset's loss masks do not pair with its images (what warm would stop on), or None. Masks
    still to be fetched are checked once they are."""
    mask = ctx.config.mask_for(dataset)
    if mask is None:
        return None
    root = local_data_dir(mask, ctx.workdir)
    if is_fetched(mask) and not root.is_dir():
        return None
    with _scratch_copy(layout.mask_probe_path(ctx.workdir, mask.id, dataset.id)) as probe_path:
        try:
            match_masks(dataset.id, mask.id, samples, root, probe_path)
        except DataError as exc:
            return exc.message
    return None


@contextmanager
def _scratch_copy(remembered: Path) -> Iterator[Path]:
    """A temporary copy of a probe file warm wrote (or where none is yet): check reads what warm learnt
    about the files and leaves the work directory as it found it."""
    with tempfile.TemporaryDirectory(prefix="lokr-check-") as scratch:
        probe_path = Path(scratch) / remembered.name
        if remembered.is_file():
            shutil.copyfile(remembered, probe_path)
        yield probe_path


def _count_listing(dataset: DatasetConfig, listing: list[str], result: DatasetCensus) -> None:
    paths = [PurePosixPath(key) for key in listing]
    images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
    result.images = len(images)
    if dataset.type == "huggingface":
        result.images = 0  # rows of parquet/arrow files: counted when fetched
        return
    if dataset.caption_strategy == "textfile":
        texts = {p.with_suffix("") for p in paths if p.suffix == ".txt"}
        missing = [p for p in images if p.with_suffix("") not in texts]
        if missing:
            result.skipped["no caption file"] = len(missing)
            result.skipped_examples = [f"{p}: no caption file" for p in missing[:_SHOWN_SKIPS]]
    if not images:
        result.problem = f"dataset {dataset.id!r}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) listed"
