"""What is done to an image before encoding: pick its bucket, resize, crop to the bucket.

SimpleTuner's rules, as its DATALOADER.md documents them:
- ``crop: false`` resizes the image (aspect kept) to cover its bucket and trims the few pixels of
  rounding from the middle.
- ``crop: true`` crops the bucket from the image at its own scale (upscaling only if the image is smaller
  than the bucket) unless ``maximum_image_size`` and ``target_downsample_size`` are both set and the image
  is larger than the first: then it is first downsampled to the second, to keep scene context.
- ``crop_aspect``: ``square``, ``preserve`` (the image's own aspect), ``closest`` (the nearest of
  ``ASPECT_CHOICES``), ``random`` (a seeded pick among the choices that fit the image).
- ``crop_style``: ``center``/``centre``, ``corner`` (bottom-right, like SimpleTuner), ``random`` (seeded by
  the job seed and the image content, so it is the same crop on every machine and every warm).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from job.config.backends import DatasetConfig
from job.data.geometry import ModelGeometry, bucket_size, is_larger_than, scale_to
from job.data.seeds import derive_seed

if TYPE_CHECKING:
    from PIL import Image

# The aspects (width / height) crop_aspect closest/random choose from: common photo and screen ratios.
ASPECT_CHOICES = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 4 / 5, 1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)


@dataclass(frozen=True)
class Transform:
    resized: tuple[int, int]  # (width, height) the upright image is resized to; its own size means no resize
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image

    @property
    def bucket(self) -> tuple[int, int]:
        left, top, right, bottom = self.crop_box
        return right - left, bottom - top


def plan_transform(
    width: int,
    height: int,
    dataset: DatasetConfig,
    geometry: ModelGeometry,
    *,
    seed: int,
    image_sha256: str,
    aspect_rounding: int | None,
) -> Transform:
    """The transform of a ``width``×``height`` upright image of ``dataset``."""
    planner = TransformPlanner(dataset, geometry, seed=seed, aspect_rounding=aspect_rounding)
    return planner.plan(width, height, image_sha256)


class TransformPlanner:
    """``plan_transform`` for the images of one dataset: what depends only on an image's size (its bucket
    and resize) is worked out once per size, since a scan meets thousands of images of a few sizes."""

    def __init__(
        self, dataset: DatasetConfig, geometry: ModelGeometry, *, seed: int, aspect_rounding: int | None
    ) -> None:
        self._dataset = dataset
        self._geometry = geometry
        self._seed = seed
        self._aspect_rounding = aspect_rounding
        self._style = dataset.crop_style if dataset.crop else "center"
        # crop_aspect random picks an image's aspect from its content: same-sized images share nothing then.
        self._by_size: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]] | None = (
            None if dataset.crop and dataset.crop_aspect == "random" else {}
        )

    def plan(self, width: int, height: int, image_sha256: str) -> Transform:
        if self._by_size is None:
            resized, bucket = self._size(width, height, image_sha256)
        elif (remembered := self._by_size.get((width, height))) is not None:
            resized, bucket = remembered
        else:
            resized, bucket = self._by_size[width, height] = self._size(width, height, image_sha256)
        left, top = _crop_origin(resized, bucket, self._style, self._seed, image_sha256)
        return Transform(resized, (left, top, left + bucket[0], top + bucket[1]))

    def _size(self, width: int, height: int, image_sha256: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """The size the image is resized to and its bucket's."""
        dataset, geometry = self._dataset, self._geometry
        assert dataset.resolution is not None and dataset.resolution_type is not None  # filled by the loader
        resolution_type = dataset.resolution_type
        aspect = _choose_aspect(
            width, height, dataset, geometry, self._seed, image_sha256, self._aspect_rounding
        )
        bucket_w, bucket_h = bucket_size(aspect, dataset.resolution, resolution_type, geometry)

        resized = (width, height)
        if not dataset.crop:
            resized = _cover(width, height, bucket_w, bucket_h)
        else:
            maximum, target = dataset.maximum_image_size, dataset.target_downsample_size
            if maximum and target and is_larger_than(width, height, maximum, resolution_type):
                scale = scale_to(width, height, target, resolution_type)
                if scale < 1:
                    resized = (max(1, round(width * scale)), max(1, round(height * scale)))
            if resized[0] < bucket_w or resized[1] < bucket_h:
                resized = _cover(*resized, bucket_w, bucket_h)
        return resized, (bucket_w, bucket_h)


def apply_transform(image: Image.Image, transform: Transform) -> Image.Image:
    from PIL import Image  # here, not above: planning a transform (a cached warm) never needs Pillow

    if image.size != transform.resized:
        image = image.resize(transform.resized, Image.Resampling.LANCZOS)
    if transform.crop_box != (0, 0, *transform.resized):
        image = image.crop(transform.crop_box)
    return image


def _choose_aspect(
    width: int,
    height: int,
    dataset: DatasetConfig,
    geometry: ModelGeometry,
    seed: int,
    image_sha256: str,
    aspect_rounding: int | None,
) -> float:
    if dataset.crop and dataset.crop_aspect == "square":
        return 1.0
    own = width / height
    if not dataset.crop or dataset.crop_aspect == "preserve":
        if aspect_rounding is None:
            return own
        # Rounding groups near-identical aspects into one bucket; never round an aspect down to zero.
        return max(round(own, aspect_rounding), 10.0**-aspect_rounding)
    closest = min(ASPECT_CHOICES, key=lambda choice: abs(math.log(choice / own)))
    if dataset.crop_aspect == "closest":
        return closest
    # random: only aspects whose crop window fits in the image, so no choice forces an upscale.
    assert dataset.resolution is not None and dataset.resolution_type is not None
    fitting = [
        choice
        for choice in ASPECT_CHOICES
        if all(
            side <= limit
            for side, limit in zip(
                bucket_size(choice, dataset.resolution, dataset.resolution_type, geometry),
                (width, height),
                strict=True,
            )
        )
    ]
    if not fitting:
        return closest
    return random.Random(derive_seed(seed, "crop_aspect", image_sha256)).choice(fitting)


def _cover(width: int, height: int, bucket_w: int, bucket_h: int) -> tuple[int, int]:
    """The smallest aspect-keeping size of ``width``×``height`` that covers the bucket."""
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def _crop_origin(
    resized: tuple[int, int], bucket: tuple[int, int], style: str, seed: int, image_sha256: str
) -> tuple[int, int]:
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    # Nothing to choose (an image already at its bucket's size): every style gives the corner.
    if not (spare_w or spare_h):
        return 0, 0
    if style == "corner":
        return spare_w, spare_h
    if style == "random":
        rng = random.Random(derive_seed(seed, "crop", image_sha256))
        return rng.randint(0, spare_w), rng.randint(0, spare_h)
    return spare_w // 2, spare_h // 2
