"""Built-in label lists, as tuples so nobody mutates them.

- ``IMAGENET_CATEGORIES``: the 1000 ImageNet names torchvision ships offline with
  ``VGG16_Weights.IMAGENET1K_V1`` (index = network output).
- ``COCO_CATEGORIES``: the 91 entries of ``SSD300_VGG16_Weights.COCO_V1``; ``__background__`` at 0
  and ``N/A`` for unused ids, so that a class id equals the COCO category id.
- ``VOC_CLASSES``: the 20 PASCAL VOC names in the book's order (2-8 notebook cell 5) and
  ssd.pytorch's (``data/voc0712.py``); background is NOT in the list, network class ``c`` is
  ``VOC_CLASSES[c - 1]``.
"""

from __future__ import annotations

from torchvision.models import VGG16_Weights
from torchvision.models.detection import SSD300_VGG16_Weights

IMAGENET_CATEGORIES: tuple[str, ...] = tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])
COCO_CATEGORIES: tuple[str, ...] = tuple(SSD300_VGG16_Weights.COCO_V1.meta["categories"])
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

assert len(IMAGENET_CATEGORIES) == 1000 and len(COCO_CATEGORIES) == 91 and len(VOC_CLASSES) == 20
