"""Aspect buckets: samples grouped by size so that a batch shares one shape, and SimpleTuner's size rule.

A bucket must hold at least one optimizer step's worth of samples (train_batch_size ×
gradient_accumulation_steps × world size) after repeats; a smaller one is dropped with a report line, and
a dataset left with no bucket at all is an error that says how to fix it.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from job.errors import DataError

Size = tuple[int, int]


@dataclass(frozen=True)
class StepShape:
    batch_size: int  # train_batch_size, per rank
    accumulation: int  # gradient_accumulation_steps
    world_size: int

    @property
    def min_samples(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    def describe(self) -> str:
        return (
            f"train_batch_size {self.batch_size} × gradient_accumulation_steps {self.accumulation} "
            f"× world size {self.world_size}"
        )


@dataclass(frozen=True)
class BucketPlan:
    usable: dict[Size, list[int]]  # bucket (width, height) → indices of its samples, ascending
    dropped: dict[Size, list[int]]


def plan_buckets(sizes: Sequence[Size], *, repeats: int, step: StepShape) -> BucketPlan:
    """Group samples (given by their bucket sizes) and keep the buckets big enough for a step."""
    groups: dict[Size, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    usable, dropped = {}, {}
    for size in sorted(groups):
        target = usable if len(groups[size]) * (repeats + 1) >= step.min_samples else dropped
        target[size] = groups[size]
    return BucketPlan(usable, dropped)


def dropped_lines(dataset_id: str, plan: BucketPlan, *, repeats: int, step: StepShape) -> list[str]:
    return [
        f"dataset {dataset_id!r}: bucket {w}x{h} dropped: {len(members)} images × (repeats {repeats} + 1) = "
        f"{len(members) * (repeats + 1)} samples, under the {step.min_samples} one step needs ({step.describe()})"
        for (w, h), members in plan.dropped.items()
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
    raise DataError(
        f"dataset {dataset_id!r} has {images} usable images × (repeats {repeats} + 1) spread over "
        f"{len(plan.dropped)} aspect buckets (largest: {largest} images), and no bucket holds the "
        f"{step.min_samples} samples one step needs ({step.describe()}). Fix: {'; or '.join(fixes)}."
    )
