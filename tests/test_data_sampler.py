"""The sampler: a pure function of (seed, epoch), positionable, rank-aware, interleaving by size × repeats."""

from collections import Counter

import numpy as np

from job.data.sampler import EpochSampler, SamplerDataset


def _datasets() -> list[SamplerDataset]:
    photos = SamplerDataset("photos", {(32, 32): np.arange(0, 40), (48, 32): np.arange(40, 64)}, repeats=0)
    subject = SamplerDataset("subject", {(32, 32): np.arange(64, 70)}, repeats=3)
    return [photos, subject]


def _sampler(seed: int = 1, global_batch: int = 4) -> EpochSampler:
    return EpochSampler(_datasets(), seed=seed, global_batch=global_batch)


def test_batch_count_drops_each_buckets_remainder() -> None:
    # photos: 40 // 4 + 24 // 4 = 16 batches; subject: 6 × 4 = 24 samples → 6 batches.
    assert _sampler().batches_per_epoch == 22
    assert _sampler(global_batch=8).batches_per_epoch == 5 + 3 + 3


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    first, again = _sampler(), _sampler()
    assert np.array_equal(first.epoch_order(0), again.epoch_order(0))
    assert not np.array_equal(first.epoch_order(0), first.epoch_order(1))
    assert not np.array_equal(first.epoch_order(0), _sampler(seed=2).epoch_order(0))


def test_positioning_needs_no_history() -> None:
    walked = _sampler()
    sequence = [
        walked.global_batch_ids(epoch, i) for epoch in range(3) for i in range(walked.batches_per_epoch)
    ]
    resumed = _sampler()
    assert np.array_equal(resumed.global_batch_ids(2, 7), sequence[2 * walked.batches_per_epoch + 7])
    assert np.array_equal(resumed.global_batch_ids(0, 3), sequence[3])


def test_every_batch_shares_one_bucket() -> None:
    wide = set(range(40, 64))
    for batch in _sampler().epoch_order(0):
        members = set(batch.tolist())
        assert members <= wide or not members & wide


def test_repeats_and_coverage() -> None:
    order = _sampler().epoch_order(0)
    counts = Counter(order.ravel().tolist())
    assert all(counts[i] == 4 for i in range(64, 70))  # repeats 3: four times each
    assert all(counts[i] == 1 for i in range(64))  # buckets of photos divide evenly


def test_datasets_interleave_rather_than_run_in_sequence() -> None:
    order = _sampler().epoch_order(0)
    is_subject = [bool(batch[0] >= 64) for batch in order]
    assert sum(is_subject) == 6
    first_half = is_subject[: len(is_subject) // 2]
    assert 0 < sum(first_half) < 6


def test_adding_a_dataset_leaves_another_datasets_internal_order() -> None:
    alone = EpochSampler(_datasets()[:1], seed=1, global_batch=4).epoch_order(0)
    mixed = _sampler().epoch_order(0)
    photos_in_mixed = [batch for batch in mixed if batch[0] < 64]
    assert np.array_equal(np.stack(photos_in_mixed), alone)


def test_ranks_take_disjoint_slices_of_each_global_batch() -> None:
    sampler = _sampler(global_batch=4)
    batch = sampler.global_batch_ids(0, 0)
    shards = [batch[rank * 2 : rank * 2 + 2] for rank in range(2)]
    assert np.array_equal(np.concatenate(shards), batch)
