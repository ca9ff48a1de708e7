"""Images in: the bytes of each upload become the model's input, behind one interface.

:class:`ImageDecoder` (``VISION_JPEG_DECODE=cpu``) decodes with PIL in the decode threads and
preprocesses there; :class:`DeviceJpegDecoder` (``device``; the default on CUDA) only reads JPEG
headers per request and decodes the whole batch on the model's device (nvJPEG on CUDA), falling
back to PIL for other formats and for files the device cannot read. :func:`make_decoder` picks one
at start; the core (``app.inference``) calls ``prepare`` per request and ``stack`` per batch and
never asks which one runs.

:func:`decode_image` checks, in this order and before any pixel is decoded: empty bytes (400
INVALID_IMAGE); a format PIL identifies from the header (400 when none, 415 when not one of
:data:`ALLOWED_FORMATS`); ``width * height`` over the limit (413 IMAGE_TOO_LARGE, so a
decompression bomb never allocates); then ``load()`` (400 when truncated or corrupt). EXIF
orientation is applied, so sizes and boxes refer to the image as viewers show it, and every mode
becomes RGB: alpha dropped without compositing (as ``cv2.imread(..., IMREAD_COLOR)``), 16-bit grey
scaled to 8 bits, 32-bit ``I`` read as 16-bit data, float ``F`` as [0, 1] data when its maximum is
<= 1 and as [0, 255] otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.batching import is_out_of_memory
from app.errors import ApiError, image_too_large, invalid_image, unsupported_media_type
from models import Predictor

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
    except Image.DecompressionBombError as exc:  # PIL's own check, where make_decoder has not run
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise image_too_large(max_pixels, pixels=int(pixels.group(1)) if pixels else None) from None
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
        raise image_too_large(max_pixels, (width, height))
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


#: JPEG colour modes the device decoders turn into RGB as PIL does (CMYK/YCCK stay on PIL).
_DEVICE_JPEG_MODES = frozenset({"RGB", "L"})


def probe_jpeg(data: bytes, max_pixels: int) -> JpegUpload | None:
    """The header checks of :func:`decode_image`, without decoding: a :class:`JpegUpload` for a
    plain RGB or grey JPEG that ends with its EOI marker, else None (then decode with
    :func:`decode_image`, which also gives the errors for broken files).

    Raises the same ApiError as :func:`decode_image` for empty, unidentifiable, unaccepted or
    too large images. A truncated JPEG (no EOI) goes to PIL, which refuses it with 400 as always;
    a JPEG that the device cannot decode after all is decoded again by PIL (:class:`DeviceJpegDecoder`).
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
        raise image_too_large(max_pixels, (width, height))
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


# -- decoders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    """One upload ready to join a batch: its size as displayed, and the preprocessed tensor
    [3, H, W] (PIL path) or the JPEG that the batch decodes on the model's device."""

    size: tuple[int, int]  # (width, height), EXIF orientation applied
    tensor: torch.Tensor | None = None
    jpeg: JpegUpload | None = None
    image: Image.Image | None = None  # the decoded RGB image, when the caller keeps it (drawing)
    label: str = ""  # "image N: " in a request of several images, put before a batch-time error


@dataclass(frozen=True)
class Batch:
    """The images of one batch that could be read, stacked on the model's device, and the errors of
    those that could not (by position in the batch)."""

    tensor: torch.Tensor | None  # [B', 3, H, W]; None when no image could be read
    failures: dict[int, ApiError]


class ImageDecoder:
    """PIL: each upload is decoded and preprocessed in the decode threads (``VISION_JPEG_DECODE=cpu``)."""

    def __init__(self, pool: Executor, max_pixels: int) -> None:
        self.pool = pool
        self.max_pixels = max_pixels

    async def prepare(
        self, uploads: Sequence[bytes], predictor: Predictor[Any, Any], *, keep_images: bool = False
    ) -> list[PreparedImage]:
        """Every upload, ready for ``predictor``'s batch, in order. Raises the ApiError of the first
        image (by index) that cannot be used, its message prefixed with "image N: " in a request of
        several images."""
        loop = asyncio.get_running_loop()
        decode = functools.partial(self.decode, predictor=predictor, keep_image=keep_images)
        jobs = [loop.run_in_executor(self.pool, decode, data) for data in uploads]
        return first_failure(await asyncio.gather(*jobs, return_exceptions=True))

    def decode(self, data: bytes, predictor: Predictor[Any, Any], keep_image: bool) -> PreparedImage:
        """One upload through PIL and the model's preprocessing (blocking: a decode thread)."""
        image = decode_image(data, self.max_pixels)
        return PreparedImage(
            image.size, tensor=predictor.preprocess(image), image=image if keep_image else None
        )

    def stack(self, predictor: Predictor[Any, Any], images: Sequence[PreparedImage]) -> Batch:
        """The batch of ``images`` on the model's device (runs in the model's inference thread)."""
        tensors = [image.tensor for image in images if image.tensor is not None]
        return Batch(torch.stack(tensors).to(predictor.device, non_blocking=True), {})

    def warm_up(self, predictor: Predictor[Any, Any], batch_size: int) -> None:
        """Set up what the first batch would otherwise pay for (nothing for PIL)."""


class DeviceJpegDecoder(ImageDecoder):
    """JPEGs are decoded in the batch on the model's device (one nvJPEG call on CUDA, no host sync);
    per request only their headers are read, on the event loop. Other formats, CMYK JPEGs, sizes
    the tensor path does not reproduce exactly, and images kept for drawing take PIL's path. When
    the device fails a batch (one corrupt file fails it all), each of its JPEGs is decoded again
    with PIL, so the good ones are answered and a bad one gets the 400 that PIL's path gives."""

    async def prepare(
        self, uploads: Sequence[bytes], predictor: Predictor[Any, Any], *, keep_images: bool = False
    ) -> list[PreparedImage]:
        if keep_images:
            return await super().prepare(uploads, predictor, keep_images=True)
        loop = asyncio.get_running_loop()
        done: list[PreparedImage | BaseException | asyncio.Future[PreparedImage]] = []
        for index, data in enumerate(uploads):
            # a header probe takes microseconds: a hop to the decode pool would cost more than it saves
            try:
                jpeg = probe_jpeg(data, self.max_pixels)
            except ApiError as exc:
                done.append(exc)
                break  # no later image can be the first failure
            if jpeg is not None and predictor.tensor_path_ok(*jpeg.size):
                label = f"image {index}: " if len(uploads) > 1 else ""
                done.append(PreparedImage(jpeg.size, jpeg=jpeg, label=label))
            else:
                done.append(loop.run_in_executor(self.pool, self.decode, data, predictor, False))
        futures = [item for item in done if isinstance(item, asyncio.Future)]
        finished = iter(await asyncio.gather(*futures, return_exceptions=True))
        return first_failure(
            [next(finished) if isinstance(item, asyncio.Future) else item for item in done], len(uploads)
        )

    def stack(self, predictor: Predictor[Any, Any], images: Sequence[PreparedImage]) -> Batch:
        jpegs = {i: image.jpeg for i, image in enumerate(images) if image.jpeg is not None}
        labels = {i: image.label for i, image in enumerate(images)}
        if not jpegs:
            return super().stack(predictor, images)
        tensors = {i: image.tensor for i, image in enumerate(images) if image.tensor is not None}
        failures: dict[int, ApiError] = {}
        try:
            decoded = predictor.preprocess_jpegs(
                [jpeg.data for jpeg in jpegs.values()], [jpeg.orientation for jpeg in jpegs.values()]
            )
            tensors.update(zip(jpegs, decoded, strict=True))
        except (RuntimeError, ValueError) as exc:
            if is_out_of_memory(exc):
                raise  # the batcher splits the batch
            log.warning(
                "model %s: decoding %d JPEG(s) on %s failed (%s); decoding them with PIL",
                predictor.info.name,
                len(jpegs),
                predictor.device,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            for i, jpeg in jpegs.items():
                try:
                    tensors[i] = predictor.preprocess(decode_image(jpeg.data, self.max_pixels))
                except ApiError as error:
                    error.message = labels[i] + error.message
                    failures[i] = error
        if not tensors:
            return Batch(None, failures)
        device = predictor.device
        return Batch(
            torch.stack([tensors[i].to(device, non_blocking=True) for i in sorted(tensors)]), failures
        )

    def warm_up(self, predictor: Predictor[Any, Any], batch_size: int) -> None:
        """The device decoder's first call sets it up (nvJPEG handles): make it now."""
        predictor.preprocess_jpegs([blank_jpeg()] * batch_size, [1] * batch_size)


def make_decoder(on_device: bool, pool: Executor, max_pixels: int) -> ImageDecoder:
    """The decoder the settings ask for (``Settings.jpeg_on_device``).

    PIL's own decompression-bomb check is switched off for the process: every upload's size is
    checked against ``max_pixels`` before its pixels are decoded, and the one limit that applies,
    with one answer (413 IMAGE_TOO_LARGE naming the size and the setting), is the service's own,
    also when ``VISION_MAX_IMAGE_PIXELS`` is above PIL's default.
    """
    Image.MAX_IMAGE_PIXELS = None
    return DeviceJpegDecoder(pool, max_pixels) if on_device else ImageDecoder(pool, max_pixels)


def first_failure(
    results: Sequence[PreparedImage | BaseException], count: int | None = None
) -> list[PreparedImage]:
    """``results`` when every one is a PreparedImage; else raise the first failure by index, its
    message prefixed with "image N: " when the request has several images (``count``, default
    ``len(results)``)."""
    several = (count if count is not None else len(results)) > 1
    for index, item in enumerate(results):
        if isinstance(item, ApiError):
            if several:
                item.message = f"image {index}: {item.message}"
            raise item
        if isinstance(item, BaseException):
            raise item
    return [item for item in results if isinstance(item, PreparedImage)]


@functools.cache
def blank_jpeg() -> bytes:
    """A small grey JPEG for warming up a device's JPEG decoder."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()
