"""Caching loss masks beside the latents: each mask cropped as its image, averaged onto the latent grid.

SimpleTuner reads a mask's first channel (red, or the grey of a greyscale mask) as the weight of each
pixel, 0 for black to 1 for white, and area-averages it to the loss's size, the latent's. Done once in
warm here, the mask entry is ``mask``: [1, h, w] float32 at the latent's h×w, what training multiplies the
loss by. Imported by warm only when a mask is missing (this module needs torch).
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from job.cache.entries import save_entry
from job.cache.store import CacheIndex
from job.data.images import UnreadableImage, read_image_file
from job.data.masks import MaskFiles
from job.data.scan import Sample
from job.data.transform import Transform, apply_transform
from job.errors import DataError
from job.progress import Progress


def mask_weights(image: Image.Image, transform: Transform, latent_scale: int) -> torch.Tensor:
    """The loss weights of a mask image: [1, h, w] float32 in [0, 1], h×w the latent grid of its bucket."""
    cropped = apply_transform(image, transform)
    red = torch.from_numpy(np.asarray(cropped, dtype=np.float32)[:, :, 0] / 255.0)
    size = (cropped.height // latent_scale, cropped.width // latent_scale)
    return torch.nn.functional.interpolate(red[None, None], size=size, mode="area")[0]


def fill_masks(
    masks: MaskFiles, missing: list[tuple[str, Sample]], index: CacheIndex, latent_scale: int
) -> None:
    """Write the mask entries of ``missing`` (key, sample) into the index's folder."""

    def encode(item: tuple[str, Sample]) -> None:
        key, sample = item
        try:
            data, image = read_image_file(masks.root / sample.relpath)
        except UnreadableImage as problem:
            raise DataError(
                f"dataset {masks.dataset_id!r}: the mask of {sample.relpath}: {problem}"
            ) from None
        if hashlib.sha256(data).hexdigest() != masks.sha256[sample.relpath]:
            raise DataError(
                f"dataset {masks.dataset_id!r}: the mask of {sample.relpath} changed during warm; run warm again"
            )
        weights = mask_weights(image, sample.transform, latent_scale)
        save_entry(
            index.cache_dir, key, {"mask": weights}, {"dataset": masks.dataset_id, "mask": sample.relpath}
        )

    try:
        with (
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
            Progress(f"masks {masks.dataset_id}", len(missing), unit="mask") as progress,
        ):
            for (key, sample), _ in zip(missing, pool.map(encode, missing), strict=True):
                index.add(key, sample.relpath)
                progress.update(1)
    finally:
        index.save()
