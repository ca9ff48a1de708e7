"""Plain data types shared by the model wrappers and their callers.

Nothing here imports HTTP or settings code: ``app/`` builds these from its own configuration and
reads the outputs back. The request defaults (``ClassifyOptions``, ``DetectParams``) are written
here once; the service's routes, models file and documentation take them from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from models.errors import ModelConfigError

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

#: The task each architecture serves.
ARCH_TASKS: dict[str, Task] = {
    "vgg16": "classify",
    "vgg16_bn": "classify",
    "ssd300": "detect",
    "ssd512": "detect",
}

#: Device names :func:`models.predictors.resolve_device` takes (``auto`` is the service's own).
DEVICE_PATTERN = r"cpu|cuda(:\d+)?"


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

    def __post_init__(self) -> None:
        """Check what can be checked without the file; raises ModelConfigError naming the model."""
        where = f"model {self.name!r}"
        if self.task not in TASK_OPTIONS:
            raise ModelConfigError(f"{where}: unknown task {self.task!r}; use 'classify' or 'detect'")
        if self.arch not in ARCHS:
            raise ModelConfigError(f"{where}: unknown arch {self.arch!r}; one of {', '.join(ARCHS)}")
        if self.format not in FORMATS:
            raise ModelConfigError(f"{where}: unknown format {self.format!r}; one of {', '.join(FORMATS)}")
        if ARCH_TASKS[self.arch] != self.task:
            raise ModelConfigError(
                f"{where}: arch {self.arch!r} is a {ARCH_TASKS[self.arch]} model, but task is {self.task!r}"
            )
        other: Task = "detect" if self.task == "classify" else "classify"
        misplaced = [name for name in TASK_SPEC_FIELDS[other] if getattr(self, name) is not None]
        if misplaced:
            raise ModelConfigError(f"{where}: {', '.join(misplaced)} do(es) not apply to a {self.task} model")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ModelConfigError(f"{where}: {name} must be at least 1, not {value}")

    def request_defaults(self) -> dict[str, Any]:
        """The request options this entry sets (the others keep the model's or the contract's)."""
        names = TASK_OPTIONS[self.task]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass(frozen=True)
class ClassifyOptions:
    """Per-image classifier options; the defaults are the contract's (``docs/api.md``)."""

    top_k: int = 5  # predictions per image (all classes when there are fewer)


@dataclass(frozen=True)
class ClassifyOutput:
    """Top-k for one image, on the CPU: ``scores`` (FloatTensor[k]) softmax probabilities in
    descending order, ``class_ids`` (LongTensor[k]) positions in the model's ``labels``."""

    scores: torch.Tensor
    class_ids: torch.Tensor


@dataclass(frozen=True)
class DetectParams:
    """Per-image post-processing parameters (images of one batch may differ); the defaults are the
    contract's (``docs/api.md``)."""

    score_threshold: float = 0.5
    iou_threshold: float | None = None  # None: the model's own (0.45 for SSD)
    max_detections: int | None = 100  # None: no overall cap (the book's behaviour)


#: The request options of each task (the fields of ClassifyOptions and DetectParams).
TASK_OPTIONS: dict[Task, tuple[str, ...]] = {
    "classify": tuple(f.name for f in fields(ClassifyOptions)),
    "detect": tuple(f.name for f in fields(DetectParams)),
}
#: The ModelSpec fields that only one task takes.
TASK_SPEC_FIELDS: dict[Task, tuple[str, ...]] = {
    "classify": (*TASK_OPTIONS["classify"], "resize", "crop"),
    "detect": TASK_OPTIONS["detect"],
}


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
    #: what a request gets for each option it does not send (the model's ``default_options``)
    defaults: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)
