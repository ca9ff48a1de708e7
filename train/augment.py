"""SSD training augmentations in the book's order (book-ssd.md 2.9): photometric distortion, expand,
random sample crop, mirror; the book's ``data_augumentation.py`` written for NumPy 2.

Every step is ``(image, boxes, labels, rng) -> (image, boxes, labels)`` on ``image`` float32[H, W, 3]
RGB 0-255, ``boxes`` float32[N, 4] [x1, y1, x2, y2] in pixels and ``labels`` int64[N], drawing from
``rng`` (a ``numpy.random.Generator``, no global state). The resize and mean subtraction are the
service's own ``models.preprocess.SSDTransform``, applied by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from models.preprocess import SSD_PIXEL_MEAN_RGB

__all__ = [
    "SAMPLE_CROP_MODES",
    "Augment",
    "expand",
    "mirror",
    "photometric_distort",
    "random_sample_crop",
    "ssd_train_augment",
]

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]
Augment = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], Sample]

#: (min IoU, max IoU) per mode; None = use the whole image. The paper's 0.1 .. 0.9 and "any patch".
SAMPLE_CROP_MODES: tuple[tuple[float, float] | None, ...] = (
    None, (0.1, float("inf")), (0.3, float("inf")), (0.7, float("inf")), (0.9, float("inf")),
    (float("-inf"), float("inf")),
)  # fmt: skip


# ----------------------------------------------------------------------------------------- colour


def _hsv_stage(image: np.ndarray, saturation: float | None, hue: float | None) -> np.ndarray:
    """Scale the HSV saturation by ``saturation`` and turn the hue by ``hue`` degrees (either may be
    None), through PIL's 8-bit HSV (a hue step is 360/256 degrees; the result is 8-bit anyway)."""
    if saturation is None and hue is None:
        return image
    pixels = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "RGB")
    hsv = np.asarray(pixels.convert("HSV"), dtype=np.float32)  # H, S, V each 0-255
    if saturation is not None:
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    if hue is not None:
        hsv[..., 0] = (hsv[..., 0] + hue * 256 / 360) % 256
    back = Image.fromarray((hsv.round() % 256).astype(np.uint8), "HSV")  # S, V <= 255: only H wraps
    return np.asarray(back.convert("RGB"), dtype=np.float32)


def photometric_distort(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> Sample:
    """The book's ``PhotometricDistort``: brightness +-32 (p 0.5); then contrast x[0.5, 1.5] (p 0.5)
    either before or after (p 0.5 each) an HSV stage of saturation x[0.5, 1.5] (p 0.5) and hue
    +-18 degrees (p 0.5); then a random channel permutation (p 0.5). Boxes are unchanged. The result
    is clipped to 0-255 (the book leaves it unclipped; the service's input is 8-bit anyway)."""
    image = image.astype(np.float32, copy=True)
    if rng.random() < 0.5:
        image += rng.uniform(-32, 32)

    def contrast(x: np.ndarray) -> np.ndarray:
        return x * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else x

    contrast_first = rng.random() < 0.5
    if contrast_first:
        image = contrast(image)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.uniform(-18, 18) if rng.random() < 0.5 else None
    image = _hsv_stage(image, saturation, hue)
    if not contrast_first:
        image = contrast(image)
    if rng.random() < 0.5:
        image = image[..., rng.permutation(3)]
    return np.clip(image, 0, 255).astype(np.float32), boxes, labels


# ----------------------------------------------------------------------------------------- geometry


def expand(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    fill: Sequence[float] = SSD_PIXEL_MEAN_RGB,
    max_ratio: float = 4.0,
    p: float = 0.5,
) -> Sample:
    """Zoom out (p 0.5): put the image at a random place on a canvas ``ratio`` times its size
    (ratio in [1, max_ratio]) filled with ``fill`` (the SSD pixel mean, so it becomes 0 after the
    mean subtraction); boxes move with it."""
    if rng.random() >= p:
        return image, boxes, labels
    height, width, depth = image.shape
    ratio = rng.uniform(1, max_ratio)
    left = int(rng.uniform(0, width * ratio - width))
    top = int(rng.uniform(0, height * ratio - height))
    canvas = np.empty((int(height * ratio), int(width * ratio), depth), dtype=image.dtype)
    canvas[...] = np.asarray(fill, dtype=image.dtype)
    canvas[top : top + height, left : left + width] = image
    shifted = boxes + np.array([left, top, left, top], dtype=boxes.dtype)
    return canvas, shifted, labels


def _iou_with(boxes: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """IoU of each of ``boxes`` (float[N, 4]) with one ``rect`` (float[4]) -> float[N]."""
    lt = np.maximum(boxes[:, :2], rect[:2])
    rb = np.minimum(boxes[:, 2:], rect[2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    rect_area = (rect[2:] - rect[:2]).prod()
    iou: np.ndarray = inter / (area + rect_area - inter)
    return iou


def random_sample_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    modes: Sequence[tuple[float, float] | None] = SAMPLE_CROP_MODES,
    trials: int = 50,
    rounds: int = 20,
) -> Sample:
    """Zoom in (SSD paper section 2.2, "Data augmentation"): pick a mode; None keeps the image;
    otherwise try up to ``trials`` patches with sides in [0.3, 1] of the image's and aspect h/w in
    [0.5, 2], accept the first one that some box overlaps with min_iou <= IoU <= max_iou and that
    holds at least one box centre. Boxes whose centre falls outside the patch are dropped, the rest
    are clipped to it. After ``trials`` failures another mode is picked; after ``rounds`` modes the
    sample is returned unchanged (amdegroot loops forever).

    The overlap test is the paper's (Caffe's): SOME box within [min_iou, max_iou]. amdegroot's
    ``overlap.min() < min_iou and max_iou < overlap.max()`` almost never rejects, so its "min IoU
    0.7" patches are any patch. The mode is drawn by index: ``np.random.choice`` on the ragged
    tuple of modes fails on NumPy >= 1.24."""
    height, width = image.shape[:2]
    if len(boxes) == 0:
        return image, boxes, labels
    for _ in range(rounds):
        mode = modes[int(rng.integers(len(modes)))]
        if mode is None:
            return image, boxes, labels
        min_iou, max_iou = mode
        for _ in range(trials):
            w = rng.uniform(0.3 * width, width)
            h = rng.uniform(0.3 * height, height)
            if h / w < 0.5 or h / w > 2:
                continue
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            rect = np.array([int(left), int(top), int(left + w), int(top + h)])
            if rect[2] <= rect[0] or rect[3] <= rect[1]:
                continue
            overlap = _iou_with(boxes, rect)
            if not np.any((overlap >= min_iou) & (overlap <= max_iou)):
                continue
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = ((centres > rect[:2]) & (centres < rect[2:])).all(axis=1)
            if not inside.any():
                continue
            kept = boxes[inside].copy()
            kept[:, :2] = np.maximum(kept[:, :2], rect[:2])
            kept[:, 2:] = np.minimum(kept[:, 2:], rect[2:])
            kept -= np.tile(rect[:2], 2).astype(kept.dtype)
            return image[rect[1] : rect[3], rect[0] : rect[2]].copy(), kept, labels[inside]
    return image, boxes, labels


def mirror(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> Sample:
    """Horizontal flip (p 0.5): x -> W - x, so [x1, x2] becomes [W - x2, W - x1]."""
    if rng.random() >= p:
        return image, boxes, labels
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image[:, ::-1].copy(), flipped, labels


def ssd_train_augment(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    fill: Sequence[float] = SSD_PIXEL_MEAN_RGB,
) -> Sample:
    """The book's training pipeline up to (not including) the resize: photometric distortion,
    expand, random sample crop, mirror. Boxes stay in pixels of the returned image."""
    image, boxes, labels = photometric_distort(image, boxes, labels, rng)
    image, boxes, labels = expand(image, boxes, labels, rng, fill)
    image, boxes, labels = random_sample_crop(image, boxes, labels, rng)
    return mirror(image, boxes, labels, rng)
