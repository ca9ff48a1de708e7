"""Synthetic "shapes" data: filled coloured shapes on textured backgrounds, in both training layouts
(class folders for the classifier, PASCAL VOC for the detector).

Every image is drawn from its own generator seeded with ``(seed, split, index)``, so a file does
not depend on how many others are written, and a held-out set is just another seed. Boxes are the
exact extent of each shape's polygon; an object mostly hidden by others is marked ``difficult``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASSES",
    "DIFFICULT_HIDDEN",
    "ShapeObject",
    "draw_classification_image",
    "draw_detection_image",
    "shape_polygon",
    "write_folders",
    "write_voc",
]

#: The shape classes, in label order (class id = index).
CLASSES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star")

#: An object with more than this fraction of its pixels covered by later shapes is "difficult".
DIFFICULT_HIDDEN = 0.6

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: class name, box [x1, y1, x2, y2] in pixels (x2, y2 exclusive edges), and
    whether it is mostly hidden by shapes drawn over it."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


def shape_polygon(name: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Vertices (float[N, 2], x then y) of shape ``name`` of size w x h before rotation by
    ``angle`` radians about its centre (cx, cy)."""
    if name == "ellipse":
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        unit = np.stack((np.cos(t), np.sin(t)), axis=1) / 2
    elif name == "rectangle":
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif name == "triangle":
        unit = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif name == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        unit = np.stack((radius * np.cos(t), radius * np.sin(t)), axis=1)
    else:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(CLASSES)}")
    points = unit * np.array([w, h])
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])  # row vectors: (x, y) -> (x c - y s, x s + y c)
    vertices: np.ndarray = rotated + np.array([cx, cy])
    return vertices


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured RGB background, float32[H, W, 3] in 0-255: a blurred colour field, plus stripes or
    a checkerboard, plus pixel noise."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0.0, rng.uniform(10, 45), size=(rng.integers(2, 7), rng.integers(2, 7), 3))
    field = (
        np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC
            ),
            dtype=np.float32,
        )
        - 128.0
    )
    image = base + field
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = rng.integers(3)
    if pattern == 0:  # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        image += wave[..., None] * rng.uniform(5, 30) * rng.choice([-1.0, 1.0], size=3)
    elif pattern == 1:  # checkerboard
        cell = rng.uniform(8, 48)
        checks = ((xx // cell + yy // cell) % 2) * 2 - 1
        image += checks[..., None] * rng.uniform(5, 25) * rng.choice([-1.0, 1.0], size=3)
    image += rng.normal(0.0, rng.uniform(2, 10), size=image.shape)
    return np.clip(image, 0, 255).astype(np.float32)


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour at least some distance from ``avoid`` (the local background mean)."""
    best: np.ndarray | None = None
    for _ in range(20):
        hue = rng.uniform(0, 6)
        sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
        x = val * sat * (1 - abs(hue % 2 - 1))
        chroma = val * sat
        rgb = [(chroma, x, 0), (x, chroma, 0), (0, chroma, x), (0, x, chroma), (x, 0, chroma), (chroma, 0, x)]
        candidate = (np.array(rgb[int(hue)]) + (val - chroma)) * 255
        if best is None or np.abs(candidate - avoid).sum() > np.abs(best - avoid).sum():
            best = candidate
        if np.abs(candidate - avoid).sum() > 150:
            break
    assert best is not None
    r, g, b = (int(v) for v in best)
    return r, g, b


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _place(
    rng: np.random.Generator,
    name: str,
    width: int,
    height: int,
    scale: tuple[float, float],
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A random polygon of class ``name`` that lies inside the image, and its box."""
    short = min(width, height)
    for _ in range(100):
        size = rng.uniform(*scale) * short
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # w / h
        if name == "star":
            aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        scale_down = max(w, h) / size  # keep the longer side at most `size`
        w, h = w / scale_down, h / scale_down
        turn = math.pi / 12 if name == "rectangle" else math.pi  # rectangles stay near upright
        angle = rng.uniform(-turn, turn)
        poly = shape_polygon(name, 0.0, 0.0, w, h, angle)
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        span = hi - lo
        if span[0] >= width - 2 or span[1] >= height - 2:
            continue
        cx = rng.uniform(1 - lo[0], width - 1 - hi[0])
        cy = rng.uniform(1 - lo[1], height - 1 - hi[1])
        poly = poly + np.array([cx, cy])
        x1, y1 = poly.min(axis=0)
        x2, y2 = poly.max(axis=0)
        return poly, (float(x1), float(y1), float(x2), float(y2))
    raise RuntimeError(f"could not place a {name} of scale {scale} in a {width}x{height} image")


def _draw(
    rng: np.random.Generator,
    width: int,
    height: int,
    names: Sequence[str],
    scale: tuple[float, float],
    max_iou: float,
) -> tuple[Image.Image, list[ShapeObject]]:
    canvas = _background(rng, width, height)
    image = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    ids = Image.new("L", (width, height), 0)  # which shape owns each pixel (0: background)
    id_draw = ImageDraw.Draw(ids)
    placed: list[tuple[str, tuple[float, float, float, float], int]] = []
    for name in names:
        for _ in range(30):
            poly, box = _place(rng, name, width, height, scale)
            if all(_iou(box, other) <= max_iou for _, other, _ in placed):
                break
        else:
            continue  # no room left for this one
        x1, y1, x2, y2 = (int(v) for v in (box[0], box[1], math.ceil(box[2]), math.ceil(box[3])))
        local = canvas[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).mean(axis=0)
        points = [(float(x), float(y)) for x, y in poly]
        fill = _colour(rng, local)
        outline = tuple(int(c * 0.55) for c in fill) if rng.random() < 0.5 else None
        draw.polygon(points, fill=fill, outline=outline, width=2 if outline else 0)
        id_draw.polygon(points, fill=len(placed) + 1)
        area = int(np.count_nonzero(np.asarray(ids) == len(placed) + 1))
        placed.append((name, box, area))
    owner = np.asarray(ids)
    objects = []
    for k, (name, box, area) in enumerate(placed, start=1):
        visible = int(np.count_nonzero(owner == k))
        objects.append(ShapeObject(name, box, difficult=visible < (1 - DIFFICULT_HIDDEN) * max(area, 1)))
    return image, objects


def draw_detection_image(
    seed: int,
    split: str,
    index: int,
    size: int = 300,
    max_objects: int = 5,
    scale: tuple[float, float] = (0.12, 0.6),
    classes: Sequence[str] = CLASSES,
) -> tuple[Image.Image, list[ShapeObject]]:
    """Image ``index`` of ``split`` for detection: about ``size`` pixels a side (each side 0.8-1.25x),
    1 to ``max_objects`` shapes whose longer side is ``scale`` times the shorter image side, boxes
    overlapping with IoU at most 0.35. Deterministic in (seed, split, index)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    width, height = (int(size * math.exp(rng.uniform(math.log(0.8), math.log(1.25)))) for _ in range(2))
    count = int(rng.integers(1, max_objects + 1))
    names = [classes[int(i)] for i in rng.integers(len(classes), size=count)]
    return _draw(rng, width, height, names, scale, max_iou=0.35)


def draw_classification_image(
    seed: int, split: str, index: int, size: int = 224, classes: Sequence[str] = CLASSES
) -> tuple[Image.Image, str]:
    """Image ``index`` of ``split`` for classification: ``size`` x ``size``, one shape whose longer
    side is 0.35-0.85 of the image; classes take turns (index modulo the class count)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    name = classes[index % len(classes)]
    image, objects = _draw(rng, size, size, [name], (0.35, 0.85), max_iou=1.0)
    assert len(objects) == 1
    return image, name


def write_folders(out: str | Path, train: int, val: int, seed: int = 0, size: int = 224) -> Path:
    """The classifier layout: ``out/{train,val}/<class>/NNNNN.jpg``, ``train`` and ``val`` images
    in all, classes balanced. Returns ``out``."""
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, name = draw_classification_image(seed, split, index, size)
            image.save(out / split / name / f"{index:05d}.jpg", quality=_JPEG_QUALITY)
    return out


def _voc_xml(filename: str, image: Image.Image, objects: Sequence[ShapeObject]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "1" if obj.difficult else "0"
        box = ET.SubElement(node, "bndbox")
        # VOC: 1-based pixel indices, max inclusive; the box edges x1..x2 cover pixels floor(x1)..ceil(x2)-1
        x1, y1 = math.floor(obj.box[0]), math.floor(obj.box[1])
        x2, y2 = math.ceil(obj.box[2]), math.ceil(obj.box[3])
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def write_voc(
    out: str | Path, train: int, val: int, seed: int = 0, size: int = 300, max_objects: int = 5
) -> Path:
    """The detector layout (PASCAL VOC): JPEGImages, Annotations, ImageSets/Main/{train,val}.txt and
    labels.txt (the class names, one a line). Returns ``out``."""
    out = Path(out)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        ids = []
        for index in range(count):
            image_id = f"{split}_{index:05d}"
            image, objects = draw_detection_image(seed, split, index, size, max_objects)
            image.save(out / "JPEGImages" / f"{image_id}.jpg", quality=_JPEG_QUALITY)
            _voc_xml(f"{image_id}.jpg", image, objects).write(
                out / "Annotations" / f"{image_id}.xml", encoding="unicode"
            )
            ids.append(image_id)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return out
