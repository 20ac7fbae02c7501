"""The order of samples in an epoch: a pure function of (seed, epoch), addressable by batch index.

Each bucket's samples (times ``repeats + 1``) are shuffled and cut into global batches of one shape; the
remainder that does not fill a batch waits for the next epoch's shuffle. A padded bucket (see
``job.data.buckets``) instead takes its samples an epoch from its images cycled in a shuffled order, so
each image appears as often as any other, give or take one. A dataset's batches are shuffled
across its buckets, and datasets are interleaved at random in proportion to their batch counts (so by
size × repeats). Every shuffle is seeded by name (dataset id, bucket size), so adding a dataset or an
image does not reshuffle the others. Resuming is positioning: ``global_batch(epoch, index)`` needs no
history, and a rank takes its slice of each global batch.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from job.data.buckets import Size
from job.data.seeds import derive_seed


@dataclass(frozen=True)
class SamplerDataset:
    name: str
    buckets: dict[Size, np.ndarray]  # bucket → sample ids (indices into the caller's sample table)
    repeats: int
    padded: dict[Size, int] = field(default_factory=dict)  # bucket → its samples an epoch, where padded

    def samples(self, size: Size) -> int:
        """The samples an epoch of bucket ``size``."""
        return self.padded.get(size, len(self.buckets[size]) * (self.repeats + 1))


class EpochSampler:
    def __init__(self, datasets: Sequence[SamplerDataset], *, seed: int, global_batch: int) -> None:
        self._datasets = list(datasets)
        self._seed = seed
        self.global_batch = global_batch
        self._batches_per_dataset = [
            sum(d.samples(size) // global_batch for size in d.buckets) for d in self._datasets
        ]
        self.batches_per_epoch = sum(self._batches_per_dataset)
        self._cached: tuple[int, np.ndarray] | None = None

    def global_batch_ids(self, epoch: int, index: int) -> np.ndarray:
        """The sample ids of global batch ``index`` of ``epoch`` (rank r takes slice r of it)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} is outside epoch of {self.batches_per_epoch} batches")
        return self.epoch_order(epoch)[index]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch``: shape [batches_per_epoch, global_batch]."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build(epoch))
        return self._cached[1]

    def _build(self, epoch: int) -> np.ndarray:
        order = np.empty((self.batches_per_epoch, self.global_batch), dtype=np.int64)
        labels = np.repeat(np.arange(len(self._datasets)), self._batches_per_dataset)
        labels = self._rng(epoch, "interleave").permutation(labels)
        for position, dataset in enumerate(self._datasets):
            if self._batches_per_dataset[position]:
                order[labels == position] = self._dataset_batches(dataset, epoch)
        return order

    def _dataset_batches(self, dataset: SamplerDataset, epoch: int) -> np.ndarray:
        batches = []
        for (width, height), ids in sorted(dataset.buckets.items()):
            rng = self._rng(epoch, "bucket", dataset.name, f"{width}x{height}")
            if (width, height) in dataset.padded:
                cycled = np.resize(rng.permutation(ids), dataset.padded[(width, height)])
                pool = rng.permutation(cycled)
            else:
                pool = rng.permutation(np.tile(ids, dataset.repeats + 1))
            count = len(pool) // self.global_batch
            batches.append(pool[: count * self.global_batch].reshape(count, self.global_batch))
        stacked = np.concatenate(batches)
        return stacked[self._rng(epoch, "dataset", dataset.name).permutation(len(stacked))]

    def _rng(self, epoch: int, *names: object) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(derive_seed(self._seed, epoch, *names)))
