"""Drawing answers onto images: detection boxes with labels, or a classifier's top-k, then PNG/JPEG.

Presentation only (PIL ``ImageDraw``; no model code). Sizes scale with the image so that the drawing
reads the same on a 64-pixel thumbnail and a 4000-pixel photo: the font is about 2.2% of the longer
side (never under :data:`MIN_FONT_PX`) and lines are a sixth of the font. Each class has one colour,
fixed by its ``class_id`` (hues a golden-ratio step apart), so a class looks the same on every image
and in every request. Labels sit on a filled box of the class colour, with black or white text,
whichever contrasts more, and are kept inside the image (above the box when there is room, else
just inside its top edge; moved left at the right border).

The font is Pillow's bundled one (``ImageFont.load_default(size=...)``, FreeType; Pillow >= 10.1):
nothing to download or install.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

#: The media types the render endpoints answer, in the server's order of preference.
PNG = "image/png"
JPEG = "image/jpeg"
RENDER_TYPES = (PNG, JPEG)

MIN_FONT_PX = 10
#: Font height as a fraction of the image's longer side.
FONT_FRACTION = 0.022
JPEG_QUALITY = 90
#: zlib level 1: a few times faster than the default 6 on photos, for files ~10% larger.
PNG_COMPRESS_LEVEL = 1

_GOLDEN = (math.sqrt(5) - 1) / 2  # hue step: consecutive class ids land far apart on the wheel


@dataclass(frozen=True)
class DrawnBox:
    """One detection to draw; ``box`` is [x1, y1, x2, y2] in pixels of the image as displayed."""

    box: tuple[float, float, float, float]
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class DrawnLabel:
    """One classifier prediction to list."""

    class_id: int
    label: str
    score: float


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of ``class_id``: the same for a class in every image and request."""
    hue = (0.03 + class_id * _GOLDEN) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (relative luminance, ITU-R BT.709)."""
    red, green, blue = background
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def font_size(width: int, height: int) -> int:
    """Label font size in pixels for an image of ``width`` x ``height``."""
    return max(MIN_FONT_PX, round(FONT_FRACTION * max(width, height)))


def line_width(width: int, height: int) -> int:
    """Box outline width in pixels."""
    return max(1, round(font_size(width, height) / 6))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_detections(image: Image.Image, detections: Sequence[DrawnBox]) -> Image.Image:
    """Draw each box with ``"label 0.87"`` on ``image`` (RGB, changed in place and returned).

    ``detections`` in the API's order (score, descending) are drawn in reverse: the first is drawn
    last, so its outline and label are on top where they overlap others.
    """
    width, height = image.size
    font = _font(font_size(width, height))
    line = line_width(width, height)
    draw = ImageDraw.Draw(image)
    for detection in reversed(detections):
        x1, y1, x2, y2 = detection.box
        colour = class_colour(detection.class_id)
        # pixel boxes: the outline's outer edge on the box's edges, inside the image
        left, top = _clamp(math.floor(x1), width), _clamp(math.floor(y1), height)
        right, bottom = _clamp(math.ceil(x2) - 1, width), _clamp(math.ceil(y2) - 1, height)
        draw.rectangle((left, top, max(left, right), max(top, bottom)), outline=colour, width=line)
        _label(draw, f"{detection.label} {detection.score:.2f}", (left, top), colour, font, (width, height))
    return image


def draw_predictions(image: Image.Image, predictions: Sequence[DrawnLabel]) -> Image.Image:
    """List the top-k in a translucent panel at the top-left, each with a bar as long as its score.

    Returns a new RGB image.
    """
    width, height = image.size
    size = font_size(width, height)
    font = _font(size)
    pad = max(2, size // 4)
    rows = [(f"{p.label} {p.score:.2f}", p) for p in predictions]
    text_width = max((_text_box(font, text)[0] for text, _ in rows), default=0)
    bar_height = max(2, size // 4)
    row_height = size + bar_height + pad
    panel = (0, 0, min(width, text_width + 2 * pad), min(height, pad + row_height * len(rows)))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle(panel, fill=(0, 0, 0, 160))
    bar_span = panel[2] - 2 * pad
    for row, (text, prediction) in enumerate(rows):
        top = pad + row * row_height
        draw.text((pad, top), text, font=font, fill=(255, 255, 255, 255))
        bar_top = top + size + 1
        bar_end = pad + max(1, round(bar_span * prediction.score))
        draw.rectangle(
            (pad, bar_top, bar_end, bar_top + bar_height - 1), fill=(*class_colour(prediction.class_id), 255)
        )
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def encode(image: Image.Image, media_type: str) -> bytes:
    """``image`` as a PNG or JPEG file (no metadata: the pixels are already upright)."""
    buffer = io.BytesIO()
    if media_type == JPEG:
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def negotiate(accept: str | None) -> str | None:
    """The render media type for an ``Accept`` header (RFC 9110, section 12.5.1), or None: 406.

    Each candidate takes the q-value of the most specific range that matches it (``image/jpeg``
    over ``image/*`` over ``*/*``); the highest q wins and PNG wins ties. No header, or an empty
    one, accepts anything: PNG. Ranges whose q cannot be read are ignored.
    """
    if accept is None or not accept.strip():
        return PNG
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        media_range, *params = (part.strip() for part in item.split(";"))
        media_range = media_range.lower()
        if "/" not in media_range:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = math.nan
        if math.isnan(quality) or not 0 <= quality <= 1:
            continue
        ranges[media_range] = max(quality, ranges.get(media_range, 0.0))
    best: tuple[float, str] | None = None
    for candidate in RENDER_TYPES:
        kind = candidate.split("/")[0]
        quality = next(
            (ranges[r] for r in (candidate, f"{kind}/*", "*/*") if r in ranges),
            0.0,
        )
        if quality > 0 and (best is None or quality > best[0]):
            best = (quality, candidate)
    return None if best is None else best[1]


def _clamp(value: int, size: int) -> int:
    return min(max(value, 0), size - 1)


def _text_box(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, _top, right, bottom = font.getbbox(text)
    return math.ceil(right - min(0, left)), math.ceil(bottom)


def _label(
    draw: ImageDraw.ImageDraw,
    text: str,
    corner: tuple[int, int],
    colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    image_size: tuple[int, int],
) -> None:
    """``text`` on a filled box at the box's top-left ``corner``, kept inside the image."""
    width, height = image_size
    text_width, text_height = _text_box(font, text)
    pad = max(1, text_height // 8)
    box_width, box_height = text_width + 2 * pad, text_height + 2 * pad
    x, y = corner
    x = max(0, min(x, width - box_width))  # at the right border: moved left
    y = y - box_height if y - box_height >= 0 else y  # above the box, else inside its top edge
    y = max(0, min(y, height - box_height))
    draw.rectangle((x, y, x + box_width - 1, y + box_height - 1), fill=colour)
    draw.text((x + pad, y + pad), text, font=font, fill=text_colour(colour))
