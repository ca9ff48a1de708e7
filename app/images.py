"""Decode uploaded bytes into an RGB image as displayed, refusing what the service must not decode.

Order of checks (each before any pixel is decoded):
1. empty bytes -> 400 INVALID_IMAGE;
2. PIL identifies the format from the header (``Image.open`` is lazy) -> 400 when nothing does,
   415 when it is not one of :data:`ALLOWED_FORMATS`;
3. ``width * height`` from the header over the limit -> 413 IMAGE_TOO_LARGE, so a decompression
   bomb never allocates (PIL's own DecompressionBombError maps to the same answer);
4. ``load()``; a truncated or corrupt stream -> 400 (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).

Then EXIF orientation is applied (``ImageOps.exif_transpose``), so sizes and boxes refer to the image
as viewers show it, and every mode becomes RGB: alpha is dropped without compositing (what
``cv2.imread(..., IMREAD_COLOR)`` does), 16-bit grey is scaled to 8 bits (``>> 8``), 32-bit ``I`` is
read as 16-bit data (clipped to [0, 65535]), float ``F`` as [0, 1] data when its maximum is <= 1
and as [0, 255] data otherwise.

PIL may still log its own DecompressionBombWarning for images between 89 and 179 MP when
``max_pixels`` is raised above its default; a warning filter is process-global and not thread-safe
to toggle per call, so it is left alone.
"""

from __future__ import annotations

import io
import logging
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ApiError, image_too_large, invalid_image, unsupported_media_type

log = logging.getLogger(__name__)

#: PIL format names we accept (MPO: JPEGs from cameras with several frames; the first is used).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})

#: The ``Content-Type`` values a raw image body may carry (``image/`` + one of these).
IMAGE_SUBTYPES = frozenset(
    {
        "jpeg",
        "jpg",
        "pjpeg",
        "png",
        "x-png",
        "webp",
        "bmp",
        "x-bmp",
        "x-ms-bmp",
        "gif",
        "tiff",
        "x-tiff",
        "mpo",
    }
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode one upload; returns an RGB image with EXIF orientation applied.

    Raises ApiError: 400 INVALID_IMAGE, 413 IMAGE_TOO_LARGE or 415 UNSUPPORTED_MEDIA_TYPE.
    """
    if not data:
        raise invalid_image("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # over twice PIL's own limit (raised limits only)
        raise ApiError(413, "IMAGE_TOO_LARGE", "image is over PIL's decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise invalid_image("not a decodable image (JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # broken headers
        raise invalid_image(f"cannot read the image header: {exc}") from None
    if image.format not in ALLOWED_FORMATS:
        raise unsupported_media_type(
            f"image format {image.format} is not accepted; send JPEG, PNG, WebP, BMP, GIF or TIFF"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise image_too_large(width, height, max_pixels)
    try:
        image.load()  # the first frame of GIF / MPO / multi-page TIFF
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise invalid_image(f"cannot decode the image (truncated or corrupt): {exc}") from None
    upright = _apply_orientation(image)
    try:
        return to_rgb(upright)
    except ValueError as exc:
        raise unsupported_media_type(f"image mode {upright.mode} is not supported: {exc}") from None


class JpegUpload(NamedTuple):
    """A JPEG that passed every check that needs no pixels, left for the model's device to decode
    (``models.Predictor.preprocess_jpegs``): the bytes, the EXIF orientation, the displayed size."""

    data: bytes
    orientation: int  # EXIF Orientation, 1 (as stored) to 8
    size: tuple[int, int]  # (width, height) as displayed, orientation applied
    label: str = ""  # "image N: " in a request of several images, put before an error's message


#: JPEG colour modes the device decoders turn into RGB as PIL does (CMYK/YCCK stay on PIL).
_DEVICE_JPEG_MODES = frozenset({"RGB", "L"})


def probe_jpeg(data: bytes, max_pixels: int) -> JpegUpload | None:
    """The header checks of :func:`decode_image`, without decoding: a :class:`JpegUpload` for a
    plain RGB or grey JPEG that ends with its EOI marker, else None (then decode with
    :func:`decode_image`, which also gives the errors for broken files).

    Raises the same ApiError as :func:`decode_image` for empty, unidentifiable, unaccepted or
    too large images. A truncated JPEG (no EOI) goes to PIL, which refuses it with 400 as always;
    a JPEG that the device cannot decode after all is decoded again by PIL (app.service).
    """
    if not data:
        raise invalid_image("empty image")
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None  # decode_image gives the right error
    if image.format != "JPEG" or image.mode not in _DEVICE_JPEG_MODES:
        return None  # MPO (several frames), CMYK, ...: PIL's path
    width, height = image.size
    if width * height > max_pixels:
        raise image_too_large(width, height, max_pixels)
    orientation = _orientation(image)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return JpegUpload(data, orientation, (width, height))


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag, 1 when absent, invalid or unreadable (as exif_transpose does)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF: shown as stored, like _apply_orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF Orientation tag; unreadable EXIF leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not cost the client its answer
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (module docstring: alpha dropped, high bit depths scaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.uint16) >> 8  # (H, W) 16-bit -> 8-bit
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if mode == "I":
        grey = np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")  # palette transparency; PIL warns on a direct convert
    if mode in ("LA", "La"):
        return image.getchannel(0).convert("RGB")  # grey channel only
    if mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    return image.convert("RGB")
