"""Filling the caches: encode the missing entries in batches and write them, keeping the index current.

Imported by warm only when something is missing (this module needs torch). Models come wrapped in
``LazyModel`` and are loaded by the first batch that needs them.
"""

import hashlib
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from job.cache.encode import count_truncated, encode_latents, encode_prompts, image_to_pixels
from job.cache.entries import save_entry
from job.cache.keys import noise_seed
from job.cache.lazy import LazyModel
from job.cache.plan import DatasetPlan
from job.cache.store import CacheIndex
from job.data.images import UnreadableImage, read_image_file
from job.data.scan import Sample, Skipped
from job.data.transform import apply_transform
from job.progress import Progress

# Batches decoded ahead of the one the VAE is encoding.
_PREFETCH_BATCHES = 2
# A warm killed midway keeps its progress: the index is saved at least this often.
_INDEX_SAVE_INTERVAL_S = 30.0


def fill_latents(
    plan: DatasetPlan,
    missing: list[tuple[str, Sample]],
    vae: LazyModel,
    index: CacheIndex,
    batch_size: int,
    *,
    write_batch_size: int,
) -> None:
    """Encode the latents of ``missing`` (key, sample), samples of ``plan``, into the index's folder."""
    batches = _batches_by_bucket(missing, batch_size)
    with (
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
        Progress(f"latents {plan.dataset.id}", len(missing), unit="img") as progress,
        _Writer(index, pool, write_batch_size) as writer,
    ):
        for batch, futures in _prefetched(pool, plan.root, batches):
            encoded = []
            for (key, sample), future in zip(batch, futures, strict=True):
                try:
                    encoded.append((key, sample, future.result()))
                except UnreadableImage as problem:
                    plan.report.failed.append(Skipped(sample.relpath, str(problem)))
            if encoded:
                pixels = torch.stack([pixels for _, _, pixels in encoded])
                latents = encode_latents(vae.get(), pixels, [noise_seed(key) for key, _, _ in encoded])
                for (key, sample, _), latent in zip(encoded, latents, strict=True):
                    metadata = {"dataset": plan.dataset.id, "source": sample.relpath}
                    writer.write(key, {"latents": latent}, metadata, description=sample.relpath)
                plan.report.latents_new += len(encoded)
            progress.update(len(batch))


class _Writer:
    """Writes entries on a thread pool (overlapping the next batch's encoding) and indexes each one once
    its file is in place; the index is saved every ``_INDEX_SAVE_INTERVAL_S`` and on exit.

    At most ``max_pending`` entries wait to be written (SimpleTuner's ``write_batch_size``): encoding
    waits for a slow store (S3, a network filesystem) instead of holding every encoded entry in memory.
    """

    def __init__(self, index: CacheIndex, pool: ThreadPoolExecutor, max_pending: int) -> None:
        self._index = index
        self._pool = pool
        self._max_pending = max_pending
        self._pending: deque[tuple[str, object, Future[None]]] = deque()
        self._last_save = time.monotonic()

    def write(
        self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], description: object
    ) -> None:
        future = self._pool.submit(save_entry, self._index.cache_dir, key, tensors, metadata)
        self._pending.append((key, description, future))
        self._collect(wait=False)
        if time.monotonic() - self._last_save > _INDEX_SAVE_INTERVAL_S:
            self._index.save()
            self._last_save = time.monotonic()

    def _collect(self, *, wait: bool) -> None:
        while self._pending and (
            wait or self._pending[0][2].done() or len(self._pending) > self._max_pending
        ):
            key, description, future = self._pending.popleft()
            future.result()  # a failed write (a full disk) stops the warm
            self._index.add(key, description)

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._collect(wait=True)
        finally:
            self._index.save()


def _batches_by_bucket(items: list[tuple[str, Sample]], batch_size: int) -> list[list[tuple[str, Sample]]]:
    """Items cut into batches that each share one bucket size (the VAE takes one shape per call)."""
    by_bucket: dict[tuple[int, int], list[tuple[str, Sample]]] = {}
    for key, sample in items:
        by_bucket.setdefault(sample.transform.bucket, []).append((key, sample))
    return [
        members[start : start + batch_size]
        for _, members in sorted(by_bucket.items())
        for start in range(0, len(members), batch_size)
    ]


def _prefetched(
    pool: ThreadPoolExecutor, root: Path, batches: list[list[tuple[str, Sample]]]
) -> Iterator[tuple[list[tuple[str, Sample]], list[Future[torch.Tensor]]]]:
    """Each batch with its pixel futures, the next ``_PREFETCH_BATCHES`` batches already decoding."""
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, [pool.submit(_load_pixels, root, sample) for _, sample in batch]))
        if len(pending) > _PREFETCH_BATCHES:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def _load_pixels(root: Path, sample: Sample) -> torch.Tensor:
    data, image = read_image_file(root / sample.relpath)
    # The key promises these bytes; a file edited since the scan would be cached under a wrong name.
    if hashlib.sha256(data).hexdigest() != sample.sha256:
        raise UnreadableImage(
            "changed during warm: the file differs from when it was scanned; run warm again"
        )
    return image_to_pixels(apply_transform(image, sample.transform))


@dataclass
class TextFill:
    new: int = 0
    truncated: int = 0  # newly encoded captions longer than max_length tokens


def fill_text(
    missing: dict[str, str],
    index: CacheIndex,
    text_encoder: LazyModel,
    *,
    batch_size: int,
    write_batch_size: int,
    max_length: int,
) -> TextFill:
    """Encode the captions of ``missing`` (key → caption) into the index's folder."""
    result = TextFill()
    keys = list(missing)
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        Progress("text embeddings", len(missing), unit="caption") as progress,
        _Writer(index, pool, write_batch_size) as writer,
    ):
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            captions = [missing[key] for key in batch]
            tokenizer, encoder = text_encoder.get()
            embeds, masks = encode_prompts(tokenizer, encoder, captions, max_length)
            result.truncated += count_truncated(tokenizer, captions, max_length)
            for key, caption, embed, mask in zip(batch, captions, embeds, masks, strict=True):
                tensors = {"prompt_embeds": embed, "prompt_mask": mask}
                writer.write(key, tensors, {"caption": caption}, description=caption)
            result.new += len(batch)
            progress.update(len(batch))
    return result
