"""PASCAL VOC folders: class names, annotation files, splits, and the detector's data set.

A VOC folder holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt``. Each annotation is read once into a :class:`VOCTruth` (the boxes as
the file writes them: 1-based pixel indices, ``difficult`` flags kept), which the evaluation scores
against as the devkit does; training takes the book's reading of it (:class:`Annotation`: 0-based,
difficult and degenerate objects left out).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from models.labels import VOC_CLASSES
from models.preprocess import SSDTransform
from train.augment import ssd_train_augment
from train.errors import TrainError

__all__ = [
    "VOC_PIXEL_ORIGIN",
    "Annotation",
    "VOCDetection",
    "VOCTruth",
    "collate",
    "read_annotation",
    "read_labels",
    "read_split",
    "read_voc",
]

#: VOC numbers pixels from 1; the network (the book, ssd.pytorch) from 0. Training reads a
#: coordinate as ``coord - VOC_PIXEL_ORIGIN``; the VOC metric writes a detection as ``x + VOC_PIXEL_ORIGIN``.
VOC_PIXEL_ORIGIN = 1.0


def read_labels(data: Path, labels_file: Path | None) -> list[str]:
    """``labels_file``, else ``data/labels.txt``, else the 20 VOC classes (the book's order)."""
    path = labels_file or (data / "labels.txt")
    if labels_file is not None or path.is_file():
        if not path.is_file():
            raise TrainError(f"{path}: no such labels file (class names, one a line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise TrainError(f"{path} lists no class names")
        return names
    return list(VOC_CLASSES)


def read_split(root: Path, split: str) -> list[str]:
    """The image ids of ``root/ImageSets/Main/<split>.txt``, in file order."""
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise TrainError(
            f"{ids_file} is not there; expected a VOC folder "
            "(Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt)"
        )
    return [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Annotation:
    """One image's objects as training reads them: ``boxes`` float32[N, 4] [x1, y1, x2, y2] in
    pixels ((coord - 1), as the book), ``labels`` int64[N] 0-based without background."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class VOCTruth:
    """One image's objects as its annotation file gives them: ``boxes`` float64[N, 4]
    [xmin, ymin, xmax, ymax] (1-based pixel indices, max inclusive), ``labels`` int64[N] positions
    in the labels list, ``difficult`` bool[N]."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    def annotation(self, keep_difficult: bool = False) -> Annotation:
        """The book's reading (``Anno_xml2list`` without the normalisation): coordinates minus 1,
        difficult objects left out unless ``keep_difficult``, degenerate boxes left out (a box of
        zero size cannot be encoded: log of zero)."""
        boxes = (self.boxes - VOC_PIXEL_ORIGIN).astype(np.float32)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep_difficult:
            keep &= ~self.difficult
        return Annotation(self.image_id, self.width, self.height, boxes[keep], self.labels[keep])


def read_voc(path: Path, labels: Sequence[str]) -> VOCTruth:
    """Parse one VOC XML file; class names are matched lower-cased and stripped."""
    try:
        root = ET.parse(path).getroot()
        width = int(root.findtext("size/width", ""))
        height = int(root.findtext("size/height", ""))
    except (OSError, ET.ParseError, ValueError) as e:
        raise TrainError(f"{path}: not a VOC annotation with size/width and size/height ({e})") from None
    boxes, classes, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").lower().strip()
        if name not in labels:
            raise TrainError(
                f"{path}: class {name!r} is not in the labels ({', '.join(labels)}); "
                "give --labels FILE with every class name"
            )
        box = obj.find("bndbox")
        if box is None:
            raise TrainError(f"{path}: an object without bndbox")
        try:
            boxes.append([float(box.findtext(tag, "")) for tag in ("xmin", "ymin", "xmax", "ymax")])
        except ValueError:
            raise TrainError(f"{path}: a {name} whose bndbox lacks a number") from None
        classes.append(labels.index(name))
        difficult.append(int(obj.findtext("difficult", "0") or 0) == 1)
    return VOCTruth(
        path.stem,
        width,
        height,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(classes, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def read_annotation(path: Path, labels: Sequence[str], keep_difficult: bool = False) -> Annotation:
    """One VOC XML file as training reads it (see :meth:`VOCTruth.annotation`)."""
    return read_voc(path, labels).annotation(keep_difficult)


class VOCDetection(Dataset[tuple[Tensor, Tensor, tuple[int, int]]]):
    """A VOC split: item i -> (image FloatTensor[3, S, S] from ``SSDTransform``, target
    FloatTensor[N, 5] of [x1, y1, x2, y2, label] normalised, (width, height) of the original).

    ``truths`` keeps every image's annotation as the file gives it, in item order, for the
    evaluation. With ``augment``, training images go through ``ssd_train_augment`` with a
    generator seeded by (seed, epoch, index), so runs repeat whatever the number of loader
    workers; call :meth:`set_epoch` before each epoch. ``drop_empty`` (training) leaves out images
    with no usable object.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        labels: Sequence[str],
        size: int,
        augment: bool = False,
        seed: int = 0,
        drop_empty: bool = False,
    ) -> None:
        ids = read_split(root, split)
        truths = [read_voc(root / "Annotations" / f"{i}.xml", labels) for i in ids]
        annotations = [t.annotation() for t in truths]
        kept = [k for k, a in enumerate(annotations) if len(a.boxes) > 0 or not drop_empty]
        self.root = root
        self.truths = [truths[k] for k in kept]
        self.annotations = [annotations[k] for k in kept]
        self.dropped = len(ids) - len(kept)
        self.transform = SSDTransform(size)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
        ann = self.annotations[index]
        with Image.open(self.root / "JPEGImages" / f"{ann.image_id}.jpg") as file:
            image = file.convert("RGB")
        original = image.size
        boxes, labels = ann.boxes, ann.labels
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pixels, boxes, labels = ssd_train_augment(np.asarray(image, dtype=np.float32), boxes, labels, rng)
            image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
        scale = np.array(image.size * 2, dtype=np.float32)  # (W, H, W, H)
        target = np.concatenate((boxes / scale, labels[:, None].astype(np.float32)), axis=1)
        return self.transform(image), torch.from_numpy(target.astype(np.float32)), original


def collate(
    batch: Sequence[tuple[Tensor, Tensor, tuple[int, int]]],
) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
    """The book's ``od_collate_fn``: stacked images, a list of per-image targets (and sizes)."""
    images, targets, sizes = zip(*batch, strict=True)
    return torch.stack(images), list(targets), list(sizes)
