"""Batch-first wrappers the service calls: :class:`Classifier`, :class:`Detector`, :func:`load_model`.

A caller preprocesses each image (PIL RGB -> FloatTensor[3, H, W]), stacks them, and calls
``run(batch, sizes, options)``: one forward pass for the whole batch (eval and inference mode,
channels_last, weights in the chosen precision), post-processing batched on the device, one output
per image on the CPU. Both wrappers share that signature, so a caller never asks which task it has.

Precision: ``fp32`` (exact answers; on CUDA it switches cuDNN's TF32 off for the process), ``bf16``
or ``fp16`` (weights and inputs cast; scores, decoding and NMS still in float32).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.checkpoints import BuiltModel, build_model
from models.detect import PostprocessConfig, postprocess
from models.errors import ModelConfigError
from models.preprocess import ClassifierTransform, SSDTransform, apply_exif_orientation, decode_jpegs
from models.ssd import SSDConfig
from models.types import (
    DEVICE_PATTERN,
    ClassifyOptions,
    ClassifyOutput,
    DetectOutput,
    DetectParams,
    ModelInfo,
    ModelSpec,
    Precision,
    Task,
)

__all__ = [
    "DTYPES",
    "Classifier",
    "Detector",
    "Predictor",
    "check_device_name",
    "device_memory",
    "load_model",
    "resolve_device",
]

#: precision name -> weight / input dtype
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(DEVICE_PATTERN)

#: A predictor's per-image options and per-image output.
OptT = TypeVar("OptT", ClassifyOptions, DetectParams)
OutT = TypeVar("OutT", ClassifyOutput, DetectOutput)


def check_device_name(name: str) -> str:
    """``name`` when it is ``cpu``, ``cuda`` or ``cuda:N``; else ModelConfigError."""
    if not _DEVICE.fullmatch(name):
        raise ModelConfigError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return name


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N`` -> torch.device.

    Raises ModelConfigError for other names, when CUDA is not available, or N is out of range.
    """
    name = check_device_name(str(device).strip())
    dev = torch.device(name)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        built_with = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ModelConfigError(
            f"device {name!r} was asked for, but CUDA is not available here (torch {torch.__version__} "
            f"{built_with}, no usable GPU visible); use device 'cpu' or run where a GPU is visible"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelConfigError(f"device {name!r} does not exist: {count} CUDA device(s), numbered from 0")
    return torch.device("cuda", index)


def device_memory(device: torch.device) -> dict[str, int] | None:
    """This process's CUDA memory on ``device``, from PyTorch's caching allocator, in bytes:
    ``allocated`` (live tensors), ``reserved`` (held from the driver, what other processes on the
    GPU cannot have) and ``peak_reserved`` (the most reserved since the process began). None off
    CUDA. Reading these is cheap: no synchronisation, no driver call. The CUDA context itself
    (hundreds of MB per process) is not counted; ``nvidia-smi`` shows it."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


class Predictor(ABC, Generic[OptT, OutT]):
    """What both wrappers share: the model on its device and dtype, its preprocessing and info.

    Attributes: ``info`` (ModelInfo), ``device``, ``dtype``, ``task``, ``model`` (nn.Module in eval
    mode), ``transform`` (the preprocessing), ``default_options`` (what a request gets for the
    options it does not send: the models file's values, else the checkpoint's, else the contract's).
    """

    task: Task

    def __init__(
        self,
        built: BuiltModel,
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
        default_options: OptT,
    ) -> None:
        self.info = info
        self.device = device
        self.dtype = dtype
        self.default_options: OptT = default_options
        self.transform: ClassifierTransform | SSDTransform = built.transform
        model = built.model.to(device=device, dtype=dtype)
        self.model: nn.Module = model.to(memory_format=torch.channels_last)
        self.model.eval()
        self._input_size = built.transform.input_size

    def preprocess(self, image: Image.Image) -> Tensor:
        """RGB PIL image (the caller converts) -> FloatTensor[3, H, W] float32 on the CPU."""
        return self.transform(image)

    def tensor_path_ok(self, width: int, height: int) -> bool:
        """Whether a (width x height) JPEG may take :meth:`preprocess_jpegs` (see the transforms)."""
        return self.transform.tensor_path_ok(width, height)

    def preprocess_jpegs(self, encoded: Sequence[bytes], orientations: Sequence[int]) -> Tensor:
        """JPEG files -> FloatTensor[B, 3, H, W] float32 on this model's device: decoded there in one
        batch (nvJPEG on CUDA: ``models.preprocess.decode_jpegs``), EXIF ``orientations`` applied, then
        the same preprocessing as :meth:`preprocess`, on the device. No host synchronisation.
        Raises RuntimeError / ValueError when a file cannot be decoded."""
        if len(encoded) != len(orientations) or not encoded:
            raise ValueError(
                f"one orientation per JPEG, at least one: {len(encoded)} and {len(orientations)}"
            )
        images = decode_jpegs(encoded, self.device)
        return torch.stack(
            [
                self.transform.from_uint8(apply_exif_orientation(image, orientation))
                for image, orientation in zip(images, orientations, strict=True)
            ]
        )

    @abstractmethod
    def run(self, batch: Tensor, sizes: Sequence[tuple[int, int]], options: Sequence[OptT]) -> list[OutT]:
        """batch (FloatTensor[B, 3, H, W]) from :meth:`preprocess`, each image's displayed (width,
        height) and options -> B outputs on the CPU, in order."""

    def forward(self, batch: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The network on a preprocessed batch, in this predictor's device, dtype and layout."""
        height, width = self._input_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, height, width) or batch.shape[0] < 1:
            raise ValueError(
                f"{self.info.name} expects a batch FloatTensor[B, 3, {height}, {width}] from preprocess(), "
                f"got {list(batch.shape)}"
            )
        x = batch.to(self.device, self.dtype, non_blocking=True, memory_format=torch.channels_last)
        out: Tensor | tuple[Tensor, Tensor] = self.model(x)
        return out

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> None:
        """One forward (and post-processing) per batch size on a blank batch, so that the first
        request does not pay for lazy initialisation (CUDA context, cuDNN algorithm choice)."""
        height, width = self._input_size
        for size in batch_sizes:
            blank = torch.zeros(size, 3, height, width)
            self.run(blank, [(width, height)] * size, [self.default_options] * size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        info = self.info
        return (
            f"{type(self).__name__}(name={info.name!r}, arch={info.arch!r}, format={info.format!r}, "
            f"classes={info.num_classes}, device={info.device!r}, dtype={info.dtype!r})"
        )


class Classifier(Predictor[ClassifyOptions, ClassifyOutput]):
    """VGG16 classifier: logits -> softmax probabilities -> top-k."""

    task: Task = "classify"

    @torch.inference_mode()
    def predict(self, batch: Tensor, top_k: int | Sequence[int] = 5) -> list[ClassifyOutput]:
        """batch (FloatTensor[B, 3, H, W]) from :meth:`preprocess` -> B outputs on the CPU.

        ``top_k``: one k for all images or one per image; k larger than the number of classes
        gives all classes. Scores are softmax probabilities (float32, clipped to [0, 1] where a
        low-precision softmax overshoots by an ulp), descending.
        """
        ks = [top_k] * batch.shape[0] if isinstance(top_k, int) else [int(k) for k in top_k]
        if len(ks) != batch.shape[0] or min(ks, default=1) < 1:
            raise ValueError(f"top_k: one k >= 1 or one per image; got {top_k!r} for {batch.shape[0]} images")
        logits = self.forward(batch)
        assert isinstance(logits, Tensor)
        probs = F.softmax(logits.float(), dim=1).clamp_(0.0, 1.0)  # (B, C)
        num_classes = probs.shape[1]
        scores, ids = probs.topk(min(max(ks), num_classes), dim=1)  # (B, k) each, descending
        scores, ids = scores.cpu(), ids.cpu()
        return [
            ClassifyOutput(scores=scores[i, : min(k, num_classes)], class_ids=ids[i, : min(k, num_classes)])
            for i, k in enumerate(ks)
        ]

    def run(
        self, batch: Tensor, sizes: Sequence[tuple[int, int]], options: Sequence[ClassifyOptions]
    ) -> list[ClassifyOutput]:
        """:meth:`predict` with each image's ``top_k`` (a classifier needs no image size)."""
        return self.predict(batch, top_k=[o.top_k for o in options])


class Detector(Predictor[DetectParams, DetectOutput]):
    """SSD detector: head outputs -> decoded, suppressed boxes in pixels of the original images.

    ``ssd_config`` gives the default boxes (``priors``, FloatTensor[A, 4] cxcywh on the device),
    ``postprocess_config`` the semantics (book or torchvision), ``class_offset`` maps network class
    c to ``labels[c - class_offset]``.
    """

    task: Task = "detect"

    def __init__(
        self,
        built: BuiltModel,
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
        default_options: DetectParams,
    ) -> None:
        super().__init__(built, info, device, dtype, default_options)
        assert built.ssd_config is not None and built.priors is not None and built.postprocess is not None
        self.ssd_config: SSDConfig = built.ssd_config
        self.priors: Tensor = built.priors.to(device=device, dtype=torch.float32)
        self.postprocess_config: PostprocessConfig = built.postprocess
        self.class_offset = built.class_offset

    @torch.inference_mode()
    def predict(
        self, batch: Tensor, image_sizes: Sequence[tuple[int, int]], params: Sequence[DetectParams]
    ) -> list[DetectOutput]:
        """batch (FloatTensor[B, 3, S, S]) from :meth:`preprocess`; ``image_sizes`` the (width,
        height) of each original image (``PIL.Image.size``); ``params`` one per image.

        Returns B outputs on the CPU: boxes in [x1, y1, x2, y2] pixels of the original image,
        clipped, empty ones dropped, score >= ``score_threshold``, score-descending, at most
        ``max_detections`` (None: no cap); ``iou_threshold`` None means the model's own (0.45).
        """
        if len(image_sizes) != batch.shape[0] or len(params) != batch.shape[0]:
            raise ValueError(
                f"a batch of {batch.shape[0]} needs as many image_sizes and params, "
                f"got {len(image_sizes)} and {len(params)}"
            )
        out = self.forward(batch)
        assert isinstance(out, tuple)
        loc, conf = out
        return postprocess(
            loc,
            conf,
            self.priors,
            image_sizes,
            params,
            self.postprocess_config,
            self.class_offset,
            self.ssd_config.variances,
        )

    def run(
        self, batch: Tensor, sizes: Sequence[tuple[int, int]], options: Sequence[DetectParams]
    ) -> list[DetectOutput]:
        """:meth:`predict`."""
        return self.predict(batch, sizes, options)


def load_model(
    spec: ModelSpec, device: str | torch.device = "cpu", precision: Precision = "fp32"
) -> Classifier | Detector:
    """Build the model ``spec`` describes, load its weights and move it to ``device`` in ``precision``.

    Raises ModelConfigError (unknown device / precision / arch / format, wrong labels count) or
    CheckpointError (missing, corrupt or mismatched weights file), each with a message to show.
    """
    dev = resolve_device(device)
    if precision not in DTYPES:
        raise ModelConfigError(f"unknown precision {precision!r}; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dev.type == "cuda" and precision == "fp32":
        # fp32 means IEEE float32: cuDNN otherwise runs float32 convolutions in TF32 (10-bit mantissa)
        # on Ampere and later GPUs, which moves scores by ~1e-5..1e-3. The flag is process-wide.
        torch.backends.cudnn.allow_tf32 = False
    built = build_model(spec, map_location=dev)
    info = ModelInfo(
        name=spec.name,
        task=built.task,
        arch=built.arch,
        format=built.format,
        labels=list(built.labels),
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        input_size=built.transform.input_size,
        sha256=built.sha256,
    )
    given = spec.request_defaults()
    if built.task == "classify":
        options = replace(ClassifyOptions(), **given)
        info.defaults = asdict(options)
        return Classifier(built, info, dev, dtype, options)
    assert built.postprocess is not None
    params = replace(DetectParams(iou_threshold=built.postprocess.nms_iou), **given)
    info.defaults = asdict(params)
    return Detector(built, info, dev, dtype, params)
