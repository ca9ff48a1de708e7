"""Drawing answers onto images: detection boxes with labels, or a classifier's top-k, then PNG/JPEG.

Presentation only (PIL ``ImageDraw``; no model code). Sizes scale with the image so that the drawing
reads the same on a 64-pixel thumbnail and a 4000-pixel photo: the font is about 2.2% of the longer
side (never under :data:`MIN_FONT_PX`) and lines are a sixth of the font. Each class has one colour,
fixed by its ``class_id`` (hues a golden-ratio step apart), so a class looks the same on every image
and in every request. Labels sit on a filled box of the class colour, with black or white text,
whichever contrasts more, and are kept inside the image (above the box when there is room, else
just inside its top edge; moved left at the right border). On small images (shorter side under
:data:`SMALL_IMAGE_PX`) a label that would hide its box or another one moves beside or below it,
shrinks, or drops its score: see :func:`label_layout`.

The font is Pillow's bundled one (``ImageFont.load_default(size=...)``, FreeType; Pillow >= 10.1):
nothing to download or install.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Iterator, Sequence
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
#: Images whose shorter side is under this get the compact label layout (:func:`label_layout`).
SMALL_IMAGE_PX = 200
#: The smallest font a label shrinks to on a small image (Pillow's bundled font reads at 8 px).
SMALL_MIN_FONT_PX = 8
#: On a small image a label covers at most this fraction of the inside of any box (within its
#: outline), its own or another's.
MAX_LABEL_COVER = 0.1
#: How many labels (the best scores) the small-image layout arranges; it compares each place with
#: every box and label, so this bounds its work when a request asks for thousands of detections.
COMPACT_LABELS = 32

_GOLDEN = (math.sqrt(5) - 1) / 2  # hue step: consecutive class ids land far apart on the wheel


@dataclass(frozen=True)
class DrawnBox:
    """One detection to draw; ``box`` is [x1, y1, x2, y2] in pixels of the image as displayed."""

    box: tuple[float, float, float, float]
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class LabelPlacement:
    """Where a detection's label goes: ``text`` in a ``font_px`` font, ``pad`` pixels inside the
    filled rectangle ``rect`` = (x1, y1, x2, y2) in pixel edges (x2, y2 exclusive), inside the image."""

    text: str
    font_px: int
    pad: int
    rect: tuple[int, int, int, int]


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
    last, so its outline and label are on top where they overlap others. Labels go where
    :func:`label_layout` puts them; on a small image they are all drawn over all the outlines.
    """
    width, height = image.size
    line = line_width(width, height)
    draw = ImageDraw.Draw(image)
    labels = label_layout((width, height), detections)
    small = min(width, height) < SMALL_IMAGE_PX
    for detection, label in zip(reversed(detections), reversed(labels), strict=True):
        colour = class_colour(detection.class_id)
        left, top, right, bottom = _pixel_box(detection.box, width, height)
        # the outline's outer edge on the box's edges, inside the image
        draw.rectangle((left, top, right - 1, bottom - 1), outline=colour, width=line)
        if not small:
            _draw_label(draw, label, colour)
    if small:  # labels over every outline, so that none is crossed out by another box
        for detection, label in zip(reversed(detections), reversed(labels), strict=True):
            _draw_label(draw, label, class_colour(detection.class_id))
    return image


def label_layout(size: tuple[int, int], detections: Sequence[DrawnBox]) -> list[LabelPlacement]:
    """Where each detection's label is drawn on an image of ``size`` = (width, height), in order.

    Usually ``"label 0.87"`` at :func:`font_size`, above the box's top-left corner, or just inside
    its top edge when there is no room above, moved left at the right border.

    On a small image (shorter side under :data:`SMALL_IMAGE_PX`) such a label easily hides its own
    box or a neighbour. There the first :data:`COMPACT_LABELS` detections (the best scores) each
    take, in turn, the most legible label that covers at most :data:`MAX_LABEL_COVER` of the inside
    of every box (within its outline) and no label placed before; among its places, the one that
    hides least; when no label qualifies, the one that hides least of all. From the most legible:
    the text ``"label 0.87"``, then ``"label"``, then the label cut short with an ellipsis if it is
    wider than the image; each from the :func:`font_size` font down to :data:`SMALL_MIN_FONT_PX`.
    Places, the preferred first on ties: above the box, beside its top corners, below it, inside
    its corners; each moved into the image.
    """
    width, height = size
    boxes = [_pixel_box(d.box, width, height) for d in detections]
    base = font_size(width, height)
    usual = [
        _label_above(f"{d.label} {d.score:.2f}", box, base, size)
        for d, box in zip(detections, boxes, strict=True)
    ]
    if min(width, height) >= SMALL_IMAGE_PX:
        return usual
    line = line_width(width, height)
    obstacles = [_inside(box, line) for box in boxes[:COMPACT_LABELS]]  # what a label must leave in view
    placed: list[LabelPlacement] = []
    covered = [0] * len(obstacles)  # pixels of each box's inside under the labels placed so far
    for index, detection in enumerate(detections[:COMPACT_LABELS]):
        least: tuple[float, LabelPlacement] | None = None  # what hides least, whatever its size
        chosen: LabelPlacement | None = None
        for text, font_px in _label_variants(detection, base, width):
            label_width, label_height, pad = _label_size(text, font_px)
            if label_width > width or label_height > height:
                continue
            fitting: tuple[float, LabelPlacement] | None = None  # the place that fits and hides least
            for rect in _places(boxes[index], (label_width, label_height), size):
                fits, hidden = _hidden(rect, index, obstacles, covered, [p.rect for p in placed])
                candidate = (hidden, LabelPlacement(text, font_px, pad, rect))
                if fits and (fitting is None or hidden < fitting[0]):
                    fitting = candidate
                if least is None or hidden < least[0]:
                    least = candidate
            if fitting is not None:
                chosen = fitting[1]
                break
        if chosen is None:
            chosen = usual[index] if least is None else least[1]  # None: not even "x..." fits the image
        placed.append(chosen)
        covered = [
            already + _overlap(chosen.rect, box) for already, box in zip(covered, obstacles, strict=True)
        ]
    return placed + usual[COMPACT_LABELS:]


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


def _draw_label(draw: ImageDraw.ImageDraw, label: LabelPlacement, colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = label.rect
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    draw.text(
        (x1 + label.pad, y1 + label.pad), label.text, font=_font(label.font_px), fill=text_colour(colour)
    )


def _clamp(value: int, size: int) -> int:
    return min(max(value, 0), size - 1)


def _pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels a box covers, (left, top, right, bottom) with right and bottom exclusive, at least
    one pixel, inside the image."""
    x1, y1, x2, y2 = box
    left, top = _clamp(math.floor(x1), width), _clamp(math.floor(y1), height)
    right, bottom = _clamp(math.ceil(x2) - 1, width), _clamp(math.ceil(y2) - 1, height)
    return left, top, max(left, right) + 1, max(top, bottom) + 1


def _inside(box: tuple[int, int, int, int], line: int) -> tuple[int, int, int, int]:
    """The pixels of a box within its outline of ``line`` pixels; the whole box if that leaves none."""
    left, top, right, bottom = box
    if right - left <= 2 * line or bottom - top <= 2 * line:
        return box
    return left + line, top + line, right - line, bottom - line


def _text_box(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, _top, right, bottom = font.getbbox(text)
    return math.ceil(right - min(0, left)), math.ceil(bottom)


def _label_size(text: str, font_px: int) -> tuple[int, int, int]:
    """(width, height, pad) of the filled rectangle behind ``text``."""
    text_width, text_height = _text_box(_font(font_px), text)
    pad = max(1, text_height // 8)
    return text_width + 2 * pad, text_height + 2 * pad, pad


def _label_above(
    text: str, box: tuple[int, int, int, int], font_px: int, size: tuple[int, int]
) -> LabelPlacement:
    """The label above the box's top-left corner, else just inside its top edge; inside the image."""
    width, height = size
    label_width, label_height, pad = _label_size(text, font_px)
    left, top = box[0], box[1]
    x = max(0, min(left, width - label_width))  # at the right border: moved left
    y = top - label_height if top - label_height >= 0 else top  # above the box, else inside its top edge
    y = max(0, min(y, height - label_height))
    return LabelPlacement(text, font_px, pad, (x, y, x + label_width, y + label_height))


def _label_variants(detection: DrawnBox, base_px: int, image_width: int) -> Iterator[tuple[str, int]]:
    """(text, font size) to try for a label on a small image, the most informative first."""
    # the usual size, two between, the smallest: a few steps, each a visible change
    steps = (
        base_px,
        round((2 * base_px + SMALL_MIN_FONT_PX) / 3),
        round((base_px + 2 * SMALL_MIN_FONT_PX) / 3),
    )
    sizes = sorted({px for px in steps if px > SMALL_MIN_FONT_PX} | {SMALL_MIN_FONT_PX}, reverse=True)
    for text in (f"{detection.label} {detection.score:.2f}", detection.label):
        for font_px in sizes:
            yield text, font_px
    name = detection.label
    if _label_size(name, SMALL_MIN_FONT_PX)[0] <= image_width:
        return
    for cut in range(len(name) - 1, 0, -1):  # the starts of the name that fit the image, longest first
        short = name[:cut].rstrip() + "\N{HORIZONTAL ELLIPSIS}"
        if _label_size(short, SMALL_MIN_FONT_PX)[0] <= image_width:
            yield short, SMALL_MIN_FONT_PX


def _places(
    box: tuple[int, int, int, int], label: tuple[int, int], size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Where a ``label`` = (width, height) rectangle may go around ``box``, the preferred first:
    above (left-aligned, right-aligned), beside the top corners (left, right), below, inside the
    corners. Each is moved into the image; repeats are dropped."""
    left, top, right, bottom = box
    label_width, label_height = label
    width, height = size
    corners = [
        # above, left- and right-aligned
        (left, top - label_height),
        (right - label_width, top - label_height),
        # beside the top corners, left and right
        (left - label_width, top),
        (right, top),
        # below
        (left, bottom),
        (right - label_width, bottom),
        # inside the corners
        (left, top),
        (right - label_width, top),
        (left, bottom - label_height),
        (right - label_width, bottom - label_height),
    ]
    places: list[tuple[int, int, int, int]] = []
    for x, y in corners:
        x, y = max(0, min(x, width - label_width)), max(0, min(y, height - label_height))
        rect = (x, y, x + label_width, y + label_height)
        if rect not in places:
            places.append(rect)
    return places


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels two (x1, y1, x2, y2) rectangles (x2, y2 exclusive) share."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(rect: tuple[int, int, int, int]) -> int:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])


def _hidden(
    rect: tuple[int, int, int, int],
    own: int,
    boxes: Sequence[tuple[int, int, int, int]],
    covered: Sequence[int],
    labels: Sequence[tuple[int, int, int, int]],
) -> tuple[bool, float]:
    """(whether, with ``rect`` added to the ``covered`` pixels of each box, every box stays covered
    by at most MAX_LABEL_COVER and ``rect`` meets none of ``labels``; how much ``rect`` hides: the
    fractions of the boxes it covers, its own box's counted twice, plus the fraction of itself on
    the labels)."""
    fits = True
    hidden = 0.0
    for index, (box, already) in enumerate(zip(boxes, covered, strict=True)):
        pixels = _overlap(rect, box)
        if pixels:
            area = _area(box)
            fits = fits and already + pixels <= MAX_LABEL_COVER * area
            hidden += pixels / area * (2 if index == own else 1)
    on_labels = sum(_overlap(rect, label) for label in labels)
    return fits and on_labels == 0, hidden + on_labels / _area(rect)
