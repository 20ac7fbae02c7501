"""Decoding an image file into upright 8-bit RGB, whatever it was stored as.

Pillow handles the formats; this module decides what "RGB" means for the awkward ones: EXIF orientation
applied, alpha composited on white (a transparent background is not black), 16-bit greyscale scaled
rather than clipped, CMYK and palette images converted. Any failure becomes ``UnreadableImage`` with a
reason ("kind: detail") for the bad-data report, never a crash.
"""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class UnreadableImage(Exception):
    """The file cannot be used as an image; the message is the reason shown in the bad-data report."""


@dataclass(frozen=True)
class ImageInfo:
    """What a scan learns from one file: its content hash and its upright size."""

    sha256: str
    width: int
    height: int


def read_image_file(path: Path) -> tuple[bytes, Image.Image]:
    """The file's bytes and its decoded RGB image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"cannot read file: {exc.strerror}") from None
    return data, decode_rgb(data)


def probe_image(path: Path) -> ImageInfo:
    """Hash and fully decode ``path`` (a truncated file only shows itself when decoded)."""
    data, image = read_image_file(path)
    return ImageInfo(hashlib.sha256(data).hexdigest(), image.width, image.height)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes into an upright RGB image."""
    if not data:
        raise UnreadableImage("empty file: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return to_rgb(upright)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image: Pillow cannot identify its format") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely: {exc}") from None
    # Malformed files raise all sorts (OSError, SyntaxError, struct.error, ...) from deep inside Pillow;
    # each one is a bad file to report, not a reason to stop the job.
    except Exception as exc:
        raise UnreadableImage(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white, 16-bit greyscale scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in image.info
