"""Aspect buckets: samples grouped by size so that a batch shares one shape, and SimpleTuner's size rule.

A bucket must hold at least one optimizer step's worth of samples (train_batch_size ×
gradient_accumulation_steps × world size) after repeats; a smaller one is dropped with a report line, and
a dataset left with no bucket at all is an error that says how to fix it. Two SimpleTuner options keep a
small bucket instead, by repeating its own images:

- ``allow_dataset_oversubscription`` (only where the dataset leaves ``repeats`` unset): the bucket gets the
  fewest repeats that fill a step, rounded up to whole steps (SimpleTuner's metadata/backends/base.py,
  ``split_buckets_between_processes``);
- ``disable_bucket_pruning``: the bucket is kept, and one that cannot fill a global batch fills one batch
  by repeating its images (what SimpleTuner's sampler does with a short bucket).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from job.config.schema import JobConfig
from job.errors import DataError

Size = tuple[int, int]


@dataclass(frozen=True)
class StepShape:
    batch_size: int  # train_batch_size, per rank
    accumulation: int  # gradient_accumulation_steps
    world_size: int
    prune: bool = True  # not disable_bucket_pruning
    oversubscribe: bool = False  # allow_dataset_oversubscription

    @classmethod
    def of(cls, job: JobConfig, world_size: int) -> "StepShape":
        return cls(
            job.train_batch_size,
            job.gradient_accumulation_steps,
            world_size,
            prune=not job.disable_bucket_pruning,
            oversubscribe=job.allow_dataset_oversubscription,
        )

    @property
    def min_samples(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def describe(self) -> str:
        return (
            f"train_batch_size {self.batch_size} × gradient_accumulation_steps {self.accumulation} "
            f"× world size {self.world_size}"
        )


@dataclass(frozen=True)
class BucketPlan:
    usable: dict[Size, list[int]]  # bucket (width, height) → indices of its samples, ascending
    dropped: dict[Size, list[int]]
    # Usable buckets whose images are repeated beyond ``repeats`` → their samples an epoch.
    padded: dict[Size, int] = field(default_factory=dict)


def plan_buckets(sizes: Sequence[Size], *, repeats: int, step: StepShape) -> BucketPlan:
    """Group samples (given by their bucket sizes) and keep the buckets big enough for a step, or made so."""
    groups: dict[Size, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    usable, dropped, padded = {}, {}, {}
    for size in sorted(groups):
        count = len(groups[size])
        if count * (repeats + 1) >= step.min_samples:
            usable[size] = groups[size]
        elif step.oversubscribe and repeats == 0:
            # SimpleTuner never overrides repeats the user set: such a bucket stays too small.
            usable[size] = groups[size]
            samples = count * math.ceil(step.min_samples / count)
            padded[size] = math.ceil(samples / step.min_samples) * step.min_samples
        elif not step.prune:
            usable[size] = groups[size]
            if count * (repeats + 1) < step.global_batch:
                padded[size] = step.global_batch
        else:
            dropped[size] = groups[size]
    return BucketPlan(usable, dropped, padded)


def dropped_lines(dataset_id: str, plan: BucketPlan, *, repeats: int, step: StepShape) -> list[str]:
    return [
        f"dataset {dataset_id!r}: bucket {w}x{h} dropped: {len(members)} images × (repeats {repeats} + 1) = "
        f"{len(members) * (repeats + 1)} samples, under the {step.min_samples} one step needs ({step.describe()})"
        for (w, h), members in plan.dropped.items()
    ]


def padded_lines(dataset_id: str, plan: BucketPlan, *, repeats: int, step: StepShape) -> list[str]:
    """One line per bucket kept by repeating its images, naming the option that kept it."""
    why = (
        "allow_dataset_oversubscription" if step.oversubscribe and repeats == 0 else "disable_bucket_pruning"
    )
    return [
        f"dataset {dataset_id!r}: bucket {w}x{h} kept by {why}: its {len(plan.usable[(w, h)])} images are "
        f"repeated to {samples} samples an epoch ({step.min_samples} make one step: {step.describe()})"
        for (w, h), samples in plan.padded.items()
    ]


def require_usable(dataset_id: str, plan: BucketPlan, *, images: int, repeats: int, step: StepShape) -> None:
    """``DataError`` when no bucket of the dataset can fill a step, with the ways to fix it."""
    if plan.usable:
        return
    largest = max((len(members) for members in plan.dropped.values()), default=0)
    fixes = []
    if largest:
        fixes.append(f"raise repeats to at least {math.ceil(step.min_samples / largest) - 1}")
    fixes.append("lower train_batch_size or gradient_accumulation_steps")
    if len(plan.dropped) > 1:
        fixes.append("set crop: true and crop_aspect: square so that every image shares one bucket")
    if repeats == 0:
        fixes.append(
            "set allow_dataset_oversubscription: true to repeat a small bucket's images to fill a step"
        )
    fixes.append("set disable_bucket_pruning: true to keep small buckets")
    raise DataError(
        f"dataset {dataset_id!r} has {images} usable images × (repeats {repeats} + 1) spread over "
        f"{len(plan.dropped)} aspect buckets (largest: {largest} images), and no bucket holds the "
        f"{step.min_samples} samples one step needs ({step.describe()}). Fix: {'; or '.join(fixes)}."
    )
