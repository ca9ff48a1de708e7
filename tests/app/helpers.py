"""Image bytes for the app tests, made with PIL (no files in the repository)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

#: EXIF tag 0x0112 (Orientation); 6 = "rotate 90 CW to display" (EXIF 2.3, table 4).
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth RGB test picture (gradients plus a block), deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(1, width - 1)).astype(np.uint8)
    green = (y * 255 // max(1, height - 1)).astype(np.uint8)
    blue = np.full((height, width), int(rng.integers(0, 255)), np.uint8)
    pixels = np.stack([red, green, blue], axis=-1)  # (H, W, 3)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 10)
    return Image.fromarray(pixels)


def jpeg(width: int = 64, height: int = 48, seed: int = 0, orientation: int | None = None) -> bytes:
    image = photo(width, height, seed)
    if orientation is None:
        return encode(image, "JPEG", quality=95)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(photo(width, height, seed), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels but whose data is one empty row:
    a few dozen bytes that would need width*height*3 bytes if decoded (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 16)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def image_in_mode(mode: str, width: int = 40, height: int = 30) -> Image.Image:
    """A test image in ``mode`` with varied content (converted from :func:`photo`)."""
    base = photo(width, height)
    if mode in ("I;16", "I;16B"):
        grey16 = np.asarray(base.convert("L"), dtype=np.uint16) * 257  # 8-bit v -> 16-bit v*257
        return Image.frombytes(mode, base.size, grey16.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    if mode == "I":
        grey32 = np.asarray(base.convert("L"), dtype=np.int32) * 257
        return Image.fromarray(grey32)
    if mode == "F":
        unit = np.asarray(base.convert("L"), dtype=np.float32) / 255.0
        return Image.fromarray(unit)
    if mode == "PA":
        return base.convert("P").convert("PA")
    image = base.convert(mode)
    if mode in ("RGBA", "LA"):  # a real alpha channel, so encoders keep it
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    return image
