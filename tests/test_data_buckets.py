"""Aspect buckets and SimpleTuner's rule: a bucket holds at least one step's samples after repeats."""

import pytest

from job.data.buckets import StepShape, dropped_lines, plan_buckets, require_usable
from job.errors import DataError

SQUARE, WIDE, TALL = (32, 32), (48, 32), (32, 48)


def test_samples_group_by_bucket_size() -> None:
    plan = plan_buckets([SQUARE, WIDE, SQUARE, TALL, WIDE], repeats=0, step=StepShape(1, 1, 1))
    assert plan.usable == {SQUARE: [0, 2], TALL: [3], WIDE: [1, 4]}
    assert plan.dropped == {}


def test_a_step_needs_batch_times_accumulation_times_world_size() -> None:
    step = StepShape(batch_size=2, accumulation=2, world_size=2)
    assert step.min_samples == 8
    plan = plan_buckets([SQUARE] * 8 + [WIDE] * 7, repeats=0, step=step)
    assert list(plan.usable) == [SQUARE] and list(plan.dropped) == [WIDE]
    (line,) = dropped_lines("photos", plan, repeats=0, step=step)
    assert "'photos'" in line and "48x32" in line and "7 samples" in line and "8" in line


def test_repeats_count_each_image_repeats_plus_one_times() -> None:
    # SimpleTuner: repeats 0 means each image once per epoch, N means N + 1 times.
    assert plan_buckets([WIDE] * 4, repeats=0, step=StepShape(8, 1, 1)).dropped
    assert plan_buckets([WIDE] * 4, repeats=1, step=StepShape(8, 1, 1)).usable == {WIDE: [0, 1, 2, 3]}


def test_no_usable_bucket_says_which_dataset_and_how_to_fix_it() -> None:
    step = StepShape(4, 1, 1)
    plan = plan_buckets([SQUARE, WIDE, WIDE], repeats=0, step=step)
    with pytest.raises(DataError) as raised:
        require_usable("subject", plan, images=3, repeats=0, step=step)
    message = raised.value.message
    assert "'subject'" in message and "3 usable images" in message
    assert "raise repeats to at least 1" in message
    assert "train_batch_size" in message and "crop_aspect: square" in message
    assert raised.value.exit_code == 3


def test_usable_plan_passes() -> None:
    plan = plan_buckets([SQUARE] * 4, repeats=0, step=StepShape(4, 1, 1))
    require_usable("ok", plan, images=4, repeats=0, step=StepShape(4, 1, 1))
