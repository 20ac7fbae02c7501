"""disable_bucket_pruning and allow_dataset_oversubscription: an aspect bucket too small for a step is
kept, as SimpleTuner keeps it, in check's census, in warm and in the batches training draws."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

from job.cache.dataset import TrainingData
from job.cache.warm import warm_caches
from job.check import build_report
from job.check.render import render_text
from job.data.buckets import StepShape, padded_lines, plan_buckets, require_usable
from job.data.sampler import EpochSampler, SamplerDataset
from job.errors import DataError

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]

SQUARE, WIDE = (32, 32), (48, 32)


def test_oversubscription_repeats_a_small_bucket_to_whole_steps_as_simpletuner_does() -> None:
    """SimpleTuner's rule (simpletuner/helpers/metadata/backends/base.py,
    ``split_buckets_between_processes``): a bucket of n images under the effective batch e gets
    ceil(e/n) - 1 repeats and is scheduled as whole effective batches. 3 images, e = 4: 6 samples → 8."""
    step = StepShape(2, 1, 2, oversubscribe=True)  # e = 2 × 1 × 2 = 4
    plan = plan_buckets([WIDE] * 3 + [SQUARE] * 4, repeats=0, step=step)
    assert plan.usable == {SQUARE: [3, 4, 5, 6], WIDE: [0, 1, 2]}
    assert plan.padded == {WIDE: 8} and plan.dropped == {}
    (line,) = padded_lines("photos", plan, repeats=0, step=step)
    assert "48x32 kept by allow_dataset_oversubscription" in line and "8 samples" in line
    assert plan_buckets([WIDE], repeats=0, step=step).padded == {WIDE: 4}


def test_oversubscription_never_overrides_the_repeats_a_dataset_sets() -> None:
    """SimpleTuner's ``user_set_repeats`` (same function): repeats above 0 are the user's, never adjusted."""
    step = StepShape(4, 1, 1, oversubscribe=True)
    plan = plan_buckets([WIDE] + [SQUARE] * 4, repeats=1, step=step)
    assert plan.dropped == {WIDE: [0]} and plan.padded == {}


def test_without_pruning_a_bucket_under_one_batch_fills_one_batch() -> None:
    """SimpleTuner's ``disable_bucket_pruning`` (metadata/backends/base.py, ``_prune_small_buckets``) keeps
    the bucket; its sampler (multiaspect/sampler.py, ``_yield_n_from_exhausted_bucket``) fills the short
    batch by repeating the bucket's own images."""
    step = StepShape(2, 2, 1, prune=False)  # a batch is 2, a step 4
    plan = plan_buckets([WIDE] + [SQUARE] * 2 + [(64, 32)] * 4, repeats=0, step=step)
    assert plan.dropped == {}
    # One image: padded to one batch. Two: a whole batch already, kept as they are.
    assert plan.padded == {WIDE: 2}
    assert set(plan.usable) == {WIDE, SQUARE, (64, 32)}


def test_no_usable_bucket_names_both_options() -> None:
    step = StepShape(4, 1, 1)
    plan = plan_buckets([SQUARE, WIDE], repeats=0, step=step)
    with pytest.raises(DataError) as raised:
        require_usable("subject", plan, images=2, repeats=0, step=step)
    assert "allow_dataset_oversubscription: true" in raised.value.message
    assert "disable_bucket_pruning: true" in raised.value.message


def test_a_padded_bucket_repeats_each_image_evenly() -> None:
    data = SamplerDataset("photos", {WIDE: np.arange(3)}, repeats=0, padded={WIDE: 8})
    sampler = EpochSampler([data], seed=1, global_batch=4)
    assert sampler.batches_per_epoch == 2
    for epoch in range(3):
        counts = Counter(sampler.epoch_order(epoch).ravel().tolist())
        assert sorted(counts) == [0, 1, 2] and sum(counts.values()) == 8
        assert max(counts.values()) - min(counts.values()) <= 1


@pytest.fixture
def one_wide_image(tmp_path: Path, tiny_model: Path) -> Path:
    """Four square images and one wide one, two images a batch: the wide bucket cannot fill a batch."""
    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"square{index}.png", (32, 32), seed=index)
    write_image(images / "wide.png", (64, 32), seed=99)
    return write_job(tmp_path, tiny_model, [dataset("photos", images)], train_batch_size=2)


def test_disable_bucket_pruning_keeps_the_bucket_in_check_and_in_training(
    one_wide_image: Path, tmp_path: Path
) -> None:
    pruned = build_report(open_job(one_wide_image, tmp_path / "work"))
    (census,) = pruned.datasets
    assert list(census.as_dict()["buckets"]) == ["32x32"]
    (line,) = census.dropped
    assert "dropped: 1 images" in line
    assert pruned.batches_per_epoch == 2

    ctx = open_job(one_wide_image, tmp_path / "work", ["disable_bucket_pruning=true"])
    kept = build_report(ctx)
    text = render_text(kept)
    (census,) = kept.datasets
    assert census.usable == 5 and census.dropped == []
    assert "kept by disable_bucket_pruning" in text, text
    assert kept.batches_per_epoch == 3 and kept.steps == 10

    warm_caches(ctx)
    data = TrainingData.open(ctx.config, ctx.workdir)
    assert data.batches_per_epoch == 3
    batches = [sorted(data.batch(0, index).keys) for index in range(3)]
    assert ["photos/wide.png", "photos/wide.png"] in batches


def test_allow_dataset_oversubscription_shows_in_the_census(one_wide_image: Path, tmp_path: Path) -> None:
    report = build_report(open_job(one_wide_image, tmp_path / "work", ["allow_dataset_oversubscription=1"]))
    (census,) = report.datasets
    assert census.usable == 5
    (line,) = census.as_dict()["padded_buckets"]
    assert "kept by allow_dataset_oversubscription: its 1 images are repeated to 2 samples" in line
    assert json.dumps(report.as_dict())  # the --json form carries it too
