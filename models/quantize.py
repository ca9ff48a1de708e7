"""Post-training static int8 quantization for the CPU, and the accuracy report that must go with it.

int8 is never a silent default: it needs calibration images of the model's own kind (the activation
ranges of every layer are measured on them), and its cost is reported against fp32 with
:func:`agreement_report`. Typical use, from an fp32 model loaded on the CPU::

    images = load_calibration_images(Path("calibration/"))        # a few dozen typical inputs
    clf = load_model(spec, device="cpu", precision="fp32")
    quantize_predictor(clf, images)                                # clf.model is now int8
    # or, with a bare network:
    batches = calibration_batches(images, clf.preprocess)
    q = quantize_int8(net, batches, example=batches[0])

Method: PyTorch's FX graph-mode static quantization (``prepare_fx`` -> run the calibration batches ->
``convert_fx``) with the ``x86`` backend's default qconfig mapping: per-channel symmetric int8 weights,
uint8 activations with histogram observers and ``reduce_range`` (7-bit activations, which the x86
kernels need to avoid overflow on CPUs without VNNI). Conv + ReLU and Linear + ReLU are fused first. The
result takes and returns float32 tensors: the input is quantized by the first op and the outputs are
dequantized.

SSD: its ``forward`` checks the input shape with Python ``if``s, which FX cannot trace, so the traced part
is a small wrapper that runs the same modules from the input to the raw head maps; around it stay float:

- ``L2Norm`` (a leaf that FX does not trace and int8 does not touch): a per-location sum of squares, a
  square root and a division have no quantized kernels, and its output scale (about 20 x a unit vector) is
  unlike the ReLU maps around it. Its input is dequantized and its output quantized again, for conv4_3's
  heads;
- the head outputs' ``permute`` / ``reshape`` / ``cat`` into (loc [B, A, 4], conf [B, A, C]) run eagerly on
  the dequantized maps: a quantized ``cat`` would force one scale on all six (or seven) sources, whose
  ranges differ, and the float reshapes cost nothing next to the convolutions.

CPU only: the quantized kernels are the CPU's (fbgemm / oneDNN); a CUDA model is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from models.agreement import MATCH_IOU, agreement_report, apply_with_report, reference_outputs
from models.errors import ModelConfigError
from models.preprocess import calibration_batches
from models.ssd import SSD, L2Norm, SSDConfig, feature_sources

if TYPE_CHECKING:
    from models.predictors import Predictor

#: a Classifier or a Detector: :func:`quantize_predictor` returns what it was given
P = TypeVar("P", bound="Predictor[Any, Any]")

__all__ = [
    "BACKEND",
    "MATCH_IOU",
    "QuantizedSSD",
    "agreement_report",
    "calibration_batches",
    "load_calibration_images",
    "quantize_int8",
    "quantize_predictor",
    "reference_outputs",
]

#: PyTorch's quantized engine for x86 CPUs: it picks fbgemm or oneDNN kernels per op
#: (``torch.backends.quantized.supported_engines``; "x86" is the default engine since torch 2.0).
BACKEND = "x86"
#: File suffixes :func:`load_calibration_images` reads.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# torch's quantization API warns on every prepare/convert that it is deprecated (torch.ao.quantization
# is still shipped and working in 2.14) and that ``reduce_range`` should become quant_min/quant_max;
# neither is actionable here, so they are silenced during quantization only.
_NOISE = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _off_cpu(t: Tensor) -> bool:
    return t.device.type != "cpu"


def _check_cpu_fp32(model: nn.Module, example: Tensor) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    elsewhere = {str(t.device) for t in tensors if _off_cpu(t)}
    if elsewhere or _off_cpu(example):
        where = ", ".join(sorted(elsewhere | ({str(example.device)} if _off_cpu(example) else set())))
        raise ValueError(
            f"int8 quantization runs on the CPU only (its kernels are fbgemm / oneDNN CPU code), but the "
            f"model or example is on {where}; use fp16 or bf16 on a GPU, or quantize a CPU copy of the model"
        )
    not_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_fp32:
        raise ValueError(
            f"int8 quantization starts from fp32 weights, but the model has {', '.join(not_fp32)} "
            f"parameters; load it in fp32 and quantize that"
        )
    if example.dim() != 4 or example.shape[0] < 1 or not example.is_floating_point():
        raise ValueError(
            f"example must be a float batch [B, C, H, W], got {example.dtype} {list(example.shape)}"
        )


class _SSDMaps(nn.Module):
    """The traceable part of an :class:`~models.ssd.SSD`: input -> raw head maps, no shape checks.

    Shares the SSD's modules (no copies). forward: x (FloatTensor[B, 3, S, S]) -> the loc maps
    (Tensor[B, n_k * 4, H_k, W_k], one per source k) followed by the conf maps (Tensor[B, n_k * C, H_k, W_k]).
    """

    def __init__(self, ssd: SSD) -> None:
        super().__init__()
        self.vgg = ssd.vgg
        self.extras = ssd.extras
        self.L2Norm = ssd.L2Norm
        self.loc = ssd.loc
        self.conf = ssd.conf

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        sources = feature_sources(self.vgg, self.L2Norm, self.extras, x)  # the same as SSD.forward
        locs = [head(s) for head, s in zip(self.loc, sources, strict=True)]
        confs = [head(s) for head, s in zip(self.conf, sources, strict=True)]
        return (*locs, *confs)


def _flatten_maps(maps: Sequence[Tensor], k: int) -> Tensor:
    """Head maps -> Tensor[B, A, k], anchors ordered (source, y, x, box) as ``SSD.forward`` orders them."""
    flat = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, k) for m in maps]  # (B, n*k, H, W) -> (B, H*W*n, k)
    return torch.cat(flat, dim=1)


class QuantizedSSD(nn.Module):
    """An int8 SSD with the float model's call: x (FloatTensor[B, 3, S, S]) -> (loc [B, A, 4],
    conf [B, A, C]), both float32. ``maps`` is the quantized graph (input -> head maps, see
    :class:`_SSDMaps`); the input check and the final reshapes run here, in float.
    """

    def __init__(self, maps: nn.Module, config: SSDConfig, num_classes: int) -> None:
        super().__init__()
        self.maps = maps
        self.config = config
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        size = self.config.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"SSD{size} expects input of shape [B, 3, {size}, {size}], got {list(x.shape)}")
        maps = self.maps(x)
        sources = len(maps) // 2
        return _flatten_maps(maps[:sources], 4), _flatten_maps(maps[sources:], self.num_classes)


def quantize_int8(model: nn.Module, calibration: Iterable[Tensor], *, example: Tensor) -> nn.Module:
    """Static int8 copy of ``model`` for the CPU, calibrated on ``calibration``; ``model`` is not changed.

    Args:
        model: an fp32 network on the CPU (eval mode is set on the copy). An :class:`~models.ssd.SSD` is
            handled as the module docstring says; any other module must be FX-traceable (VGG is).
        calibration: preprocessed batches (FloatTensor[B, 3, H, W]) of the model's own kind of images, e.g.
            from :func:`calibration_batches`. At least one image; a few dozen typical ones is the usual size.
            Never random noise: the measured activation ranges are what int8 then represents.
        example: one input batch (FloatTensor[B, 3, H, W]) of the shape the model will see, for tracing.

    Returns:
        an eval-mode module with the same call as ``model`` whose outputs are float32: the FX
        ``GraphModule`` for a traceable model, a :class:`QuantizedSSD` for an SSD.

    Raises:
        ValueError: the model or example is on a GPU; the weights are not fp32; no calibration images;
            a calibration batch of another shape than ``example`` (batch size aside); a model FX cannot trace.
        RuntimeError: this torch build has no x86 quantized engine.

    Side effect: sets ``torch.backends.quantized.engine`` to ``"x86"`` (the engine the kernels run
    with must be the one the weights were packed for).
    """
    _check_cpu_fp32(model, example)
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"this torch build ({torch.__version__}) has no {BACKEND!r} quantized engine "
            f"(it has {torch.backends.quantized.supported_engines}); int8 is not available here"
        )
    torch.backends.quantized.engine = BACKEND

    float_model = copy.deepcopy(model).eval()  # prepare_fx fuses modules in place of the originals
    ssd = float_model if isinstance(float_model, SSD) else None
    traced = _SSDMaps(ssd).eval() if ssd is not None else float_model
    custom = PrepareCustomConfig().set_non_traceable_module_classes([L2Norm])
    with _quiet():
        try:
            prepared = prepare_fx(
                traced, get_default_qconfig_mapping(BACKEND), (example,), prepare_custom_config=custom
            )
        except torch.fx.proxy.TraceError as e:
            raise ValueError(
                f"{type(model).__name__} cannot be quantized: torch.fx cannot trace its forward ({e})"
            ) from e
        seen = 0
        with torch.no_grad():
            for batch in calibration:
                if batch.dim() != 4 or batch.shape[1:] != example.shape[1:] or _off_cpu(batch):
                    dims = ", ".join(map(str, example.shape[1:]))
                    raise ValueError(
                        f"calibration batches must be CPU tensors [B, {dims}] like the example, "
                        f"got {list(batch.shape)} on {batch.device}"
                    )
                prepared(batch)
                seen += batch.shape[0]
        if seen == 0:
            raise ValueError(
                "int8 needs calibration images of the model's own kind and none were given; refusing to "
                "quantize (uncalibrated activation ranges give arbitrary answers)"
            )
        converted = convert_fx(prepared)
    if ssd is not None:
        return QuantizedSSD(converted, ssd.config, ssd.num_classes).eval()
    return converted.eval()


def load_calibration_images(directory: str | Path, max_images: int = 64) -> list[Image.Image]:
    """Up to ``max_images`` images from ``directory`` (files ending in ``IMAGE_SUFFIXES``, sorted by name,
    not recursive), decoded and converted to RGB.

    Raises ModelConfigError, saying what to do, when the directory is missing or holds no image, or a
    file there cannot be decoded: int8 is then refused rather than calibrated on something else.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ModelConfigError(
            f"int8 needs calibration images, but {str(folder)!r} is not a directory; point the int8 "
            f"calibration directory at a folder of a few dozen typical input images, or use another precision"
        )
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ModelConfigError(
            f"int8 needs calibration images, but {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} file; "
            f"add a few dozen typical input images, or use another precision"
        )
    images: list[Image.Image] = []
    for path in paths[:max_images]:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ModelConfigError(
                f"calibration image {str(path)!r} cannot be decoded ({e}); fix or remove it"
            ) from e
    return images


def quantize_predictor(predictor: P, images: Sequence[Image.Image], batch_size: int = 8) -> P:
    """Replace a CPU fp32 :class:`~models.predictors.Predictor`'s network by its int8 version, calibrated on
    ``images`` through the predictor's own preprocessing; ``info.dtype`` becomes ``"int8"``.

    The predictor's call path is unchanged (float32 inputs in channels_last, float32 outputs), so
    ``predict`` and ``warmup`` work as before. Returns the same predictor. Raises ValueError on a GPU
    predictor, a non-fp32 one, or no images.
    """
    if predictor.device.type != "cpu":
        raise ValueError(
            f"int8 runs on the CPU only; {predictor.info.name!r} is on {predictor.device}: "
            f"use fp16 or bf16 there"
        )
    if predictor.dtype != torch.float32:
        raise ValueError(
            f"int8 starts from fp32 weights; {predictor.info.name!r} was loaded in {predictor.dtype}: "
            f"load it in fp32"
        )
    batches = [
        b.contiguous(memory_format=torch.channels_last)
        for b in calibration_batches(images, predictor.preprocess, batch_size)
    ]
    predictor.model = quantize_int8(predictor.model, batches, example=batches[0])
    predictor.info = dataclasses.replace(predictor.info, dtype="int8")  # info may be shared with a copy
    return predictor


def quantize_predictor_with_report(
    predictor: P, images: Sequence[Image.Image], *, batch_size: int = 8, report_images: int = 16
) -> tuple[P, dict[str, Any]]:
    """:func:`quantize_predictor`, plus the accuracy cost on the first ``report_images`` of ``images``
    (:func:`~models.agreement.apply_with_report`: int8 against the fp32 predictor it was, in-sample)."""
    return apply_with_report(
        predictor,
        images,
        lambda p: quantize_predictor(p, images, batch_size),
        report_images=report_images,
        batch_size=batch_size,
    )
