"""Image sizes: SimpleTuner's resolution units, the model's size limits, and aspect-bucket sizes.

``resolution_type`` decides what a size number means: ``pixel`` is the shorter edge, ``pixel_area`` is the
side of a square of the same area, ``area`` is megapixels. ``minimum_image_size``, ``maximum_image_size``
and ``target_downsample_size`` are read in the same unit as ``resolution``.

Bucket sides are multiples of ``aspect_bucket_alignment`` (SimpleTuner's 64 px for AuraFlow), itself a
multiple of one transformer patch (VAE downsampling × patch size: 16 px for AuraFlow), and stay inside the
transformer's positional-embedding grid (``pos_embed_max_size`` patches, a square grid: 96×96 patches,
1536 px a side, for AuraFlow v0.3). A rendered size must fit that grid on each side: diffusers' AuraFlow
patch embedding centres the image on the grid, so a wider image reads positions from the neighbouring
rows (silently) or past the end (an IndexError).
"""

import math
from dataclasses import dataclass

from job.config.backends import DatasetConfig

# SimpleTuner reads these round megapixel values as the square areas users mean by them (1.0 → 1024²).
_AREA_ALIASES = {0.25: 512**2, 0.5: 768**2, 1.0: 1024**2, 2.0: 1536**2, 4.0: 2048**2}


@dataclass(frozen=True)
class ModelGeometry:
    alignment: int  # pixels per transformer patch: VAE downsampling × patch size
    max_patches: int  # pos_embed_max_size: the positional grid holds this many patches, square
    bucket_alignment: int | None = None  # aspect_bucket_alignment in pixels; None: one patch
    latent_scale: int = 8  # pixels per latent position: the VAE's downsampling

    @property
    def bucket_step(self) -> int:
        """What bucket sides are multiples of."""
        return self.bucket_alignment or self.alignment

    @property
    def max_side(self) -> int:
        return math.isqrt(self.max_patches) * self.alignment

    def fits(self, width: int, height: int) -> bool:
        patches = (width // self.alignment) * (height // self.alignment)
        return width <= self.max_side and height <= self.max_side and patches <= self.max_patches

    def render_problem(self, width: int, height: int) -> str | None:
        """Why the transformer cannot render ``width``×``height`` correctly, with the largest size that fits;
        None when it can."""
        align, side = self.alignment, self.max_side
        if width % align or height % align:
            return (
                f"sides must be multiples of {align} px (VAE downsampling × patch size); the nearest "
                f"that fit are {_fit_side(width, align, side)}x{_fit_side(height, align, side)}"
            )
        if self.fits(width, height):
            return None
        scale = min(side / width, side / height)
        same_aspect = f"{_shrink(width, scale, align)}x{_shrink(height, scale, align)}"
        return (
            f"{width // align}x{height // align} patches, but the transformer's positional grid is "
            f"{side // align}x{side // align} (pos_embed_max_size {self.max_patches}, {align} px a patch): the "
            f"largest size that fits is {side}x{side}"
            + ("" if same_aspect == f"{side}x{side}" else f", at this aspect {same_aspect}")
        )


def area_pixels(value: float, resolution_type: str) -> float:
    """A ``pixel_area`` or ``area`` size as a number of pixels."""
    if resolution_type == "area":
        return float(_AREA_ALIASES.get(value, value * 1e6))
    return float(value) ** 2


def is_smaller_than(width: int, height: int, minimum: float, resolution_type: str) -> bool:
    if resolution_type == "pixel":
        return min(width, height) < minimum
    return width * height < area_pixels(minimum, resolution_type)


def is_larger_than(width: int, height: int, maximum: float, resolution_type: str) -> bool:
    if resolution_type == "pixel":
        return min(width, height) > maximum
    return width * height > area_pixels(maximum, resolution_type)


def scale_to(width: int, height: int, size: float, resolution_type: str) -> float:
    """The factor that resizes a ``width``×``height`` image to ``size`` (aspect kept)."""
    if resolution_type == "pixel":
        return size / min(width, height)
    return math.sqrt(area_pixels(size, resolution_type) / (width * height))


def bucket_size(
    aspect: float, resolution: float, resolution_type: str, geometry: ModelGeometry
) -> tuple[int, int]:
    """The (width, height) of the bucket for ``aspect`` (width / height) at ``resolution``.

    The shorter side is snapped first and the longer one derived from it, so small resolutions keep
    their aspect (80×64 stays 80×64 at 64 px rather than collapsing to a square); a bucket outside the
    positional grid (an extreme aspect) is scaled down until it fits.
    """
    width, height = _unclamped_bucket(aspect, resolution, resolution_type, geometry.bucket_step)
    if geometry.fits(width, height):
        return width, height
    patch = geometry.alignment
    scale = min(
        geometry.max_side / width,
        geometry.max_side / height,
        math.sqrt(geometry.max_patches * patch * patch / (width * height)),
    )
    return _shrink(width, scale, geometry.bucket_step), _shrink(height, scale, geometry.bucket_step)


def resolution_problem(dataset: DatasetConfig, geometry: ModelGeometry) -> str | None:
    """Why ``dataset``'s resolution cannot be trained by this model, or None when it can."""
    assert dataset.resolution is not None and dataset.resolution_type is not None  # filled by the loader
    side, _ = _unclamped_bucket(1.0, dataset.resolution, dataset.resolution_type, geometry.bucket_step)
    if side <= geometry.max_side:
        return None
    largest = {
        "pixel": f"{geometry.max_side}",
        "pixel_area": f"{geometry.max_side}",
        "area": f"{geometry.max_side**2 / 1e6:.2f}",
    }[dataset.resolution_type]
    return (
        f"dataset {dataset.id!r}: resolution {dataset.resolution:g} ({dataset.resolution_type}) asks for "
        f"{side}x{side} px images, but the transformer's positional embedding (pos_embed_max_size "
        f"{geometry.max_patches}, {geometry.alignment} px per patch) allows at most "
        f"{geometry.max_side}x{geometry.max_side}; set resolution to {largest} or less"
    )


def _unclamped_bucket(aspect: float, resolution: float, resolution_type: str, align: int) -> tuple[int, int]:
    ratio = max(aspect, 1 / aspect)
    if resolution_type == "pixel":
        short = float(resolution)
    else:
        short = math.sqrt(area_pixels(resolution, resolution_type) / ratio)
    short_px = _snap(short, align)
    long_px = _snap(short_px * ratio, align)
    return (long_px, short_px) if aspect >= 1 else (short_px, long_px)


def _shrink(side: int, scale: float, align: int) -> int:
    return max(align, math.floor(side * scale / align) * align)


def _fit_side(side: int, align: int, max_side: int) -> int:
    return min(max_side, _snap(side, align))


def _snap(value: float, align: int) -> int:
    return max(align, math.floor(value / align + 0.5) * align)
