"""Plain data types shared by the model wrappers and their callers.

Nothing here imports HTTP or settings code: ``app/`` builds these from its own
configuration and reads the outputs back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Task = Literal["classify", "detect"]
Precision = Literal["fp32", "bf16", "fp16"]

#: Architectures the builders know (``models.vgg`` and ``models.ssd``).
ARCHS: tuple[str, ...] = ("vgg16", "vgg16_bn", "ssd300", "ssd512")

#: Checkpoint layouts ``models.checkpoints`` reads.
#: - ``torchvision``: torchvision's own state_dict (VGG16 ImageNet, ssd300_vgg16 COCO);
#: - ``ssd.pytorch``: the book's / amdegroot's SSD keys
#:   (``vgg.*``, ``extras.*``, ``L2Norm.weight``, ``loc.*``, ``conf.*``);
#: - ``state_dict``: a VGG16 ``state_dict()`` with a replaced ``classifier.6`` (the book's chapter 1);
#: - ``project``: our self-describing checkpoint (see ``models.checkpoints``);
#: - ``auto``: detect from the keys where that is unambiguous.
FORMATS: tuple[str, ...] = ("torchvision", "ssd.pytorch", "state_dict", "project", "auto")


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model: what the models file says about it.

    ``labels`` is None when the checkpoint carries them (``project``) or the format has a
    built-in list (torchvision ImageNet / COCO categories).
    """

    name: str
    task: Task
    arch: str
    format: str
    weights: Path
    labels: tuple[str, ...] | None = None
    sha256: str | None = None
    #: classifier preprocessing overrides (shorter side resized to ``resize``, centre crop ``crop``)
    resize: int | None = None
    crop: int | None = None
    #: per-model defaults for requests (None: the format's own default)
    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class ClassifyOutput:
    """Top-k for one image, on the CPU: ``scores`` (FloatTensor[k]) softmax probabilities in
    descending order, ``class_ids`` (LongTensor[k]) positions in the model's ``labels``."""

    scores: torch.Tensor
    class_ids: torch.Tensor


@dataclass(frozen=True)
class DetectParams:
    """Per-image post-processing parameters (images of one batch may differ)."""

    score_threshold: float = 0.5
    iou_threshold: float | None = None  # None: the model's own (0.45 for SSD)
    max_detections: int | None = 100  # None: no overall cap (the book's behaviour)


@dataclass(frozen=True)
class DetectOutput:
    """Detections for one image, on the CPU, sorted by score descending.

    boxes (FloatTensor[N, 4]) in [x1, y1, x2, y2] pixels of the original image,
    clipped so that 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H (empty boxes dropped);
    scores (FloatTensor[N]) in [0, 1]; class_ids (LongTensor[N]) positions in the model's ``labels``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    class_ids: torch.Tensor


@dataclass
class ModelInfo:
    """What callers may show about a loaded model."""

    name: str
    task: Task
    arch: str
    format: str
    labels: list[str]
    device: str
    dtype: str
    input_size: tuple[int, int]  # (height, width) of the network input
    sha256: str | None
    defaults: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)
