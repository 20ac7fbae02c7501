"""Decoding awkward and broken image files: upright 8-bit RGB, or UnreadableImage with a reason."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.data.images import UnreadableImage, decode_rgb, probe_image


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))  # type: ignore[arg-type]


def test_transparent_pixels_become_white_and_partial_alpha_blends() -> None:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    decoded = decode_rgb(_encode(rgba, "PNG"))
    assert decoded.mode == "RGB"
    assert _pixel(decoded, (0, 0)) == (255, 255, 255)
    assert all(abs(channel - 127) <= 1 for channel in _pixel(decoded, (1, 0)))


def test_greyscale_with_alpha_composites_on_white() -> None:
    image = Image.new("RGBA", (2, 2), (10, 10, 10, 0)).convert("LA")
    assert _pixel(decode_rgb(_encode(image, "PNG"))) == (255, 255, 255)


def test_palette_with_transparent_index_composites_on_white() -> None:
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    decoded = decode_rgb(_encode(palette, "PNG", transparency=1))
    assert _pixel(decoded) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((3, 3), 32896, dtype=np.uint16))  # 50% of 65535
    data = _encode(grey, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert _pixel(decode_rgb(data)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("RGB", (8, 8), (200, 30, 30)).convert("CMYK")
    decoded = decode_rgb(_encode(cmyk, "JPEG", quality=95))
    assert decoded.mode == "RGB"
    red, green, blue = _pixel(decoded, (4, 4))
    assert red > 150 and green < 80 and blue < 80


def test_exif_orientation_is_applied() -> None:
    landscape = Image.new("RGB", (40, 20), (0, 0, 0))
    landscape.paste((255, 255, 255), (0, 0, 20, 20))  # the left half is white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90° clockwise
    decoded = decode_rgb(_encode(landscape, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40)
    assert _pixel(decoded, (10, 5))[0] > 200  # the white half is now on top
    assert _pixel(decoded, (10, 35))[0] < 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_every_supported_format_decodes(fmt: str) -> None:
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    assert decode_rgb(_encode(image, fmt)).size == (16, 8)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file saved as .png\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an image|corrupt"),
    ],
)
def test_unusable_bytes_give_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UnreadableImage, match=reason):
        decode_rgb(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_corrupt(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(UnreadableImage, match="corrupt or truncated"):
        decode_rgb(data[: len(data) // 2])


def test_probe_hashes_the_bytes_and_reports_the_upright_size(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (30, 10)).save(path, exif=exif)
    info = probe_image(path)
    assert (info.width, info.height) == (10, 30)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
