"""Write checkpoint files shaped like the real ones, from seeded random weights.

Every ``write_*`` function writes one file and returns its path. The files have the same keys,
key order, shapes, dtypes and on-disk layout as the real checkpoints, so the loaders meet what
users bring:

==============================  ======================================  ===========================
function                         imitates                                 on disk
==============================  ======================================  ===========================
write_torchvision_vgg16          ``vgg16-397923af.pth`` (ImageNet, 1000)  legacy pickle, CPU tensors
write_torchvision_vgg16_bn       ``vgg16_bn-6c64b313.pth``                legacy pickle, CPU tensors
write_book_vgg16                 chapter 1 ``weights_fine_tuning.pth``    legacy pickle, tagged cuda:0
                                 (``classifier.6`` = Linear(4096, 2))
write_book_ssd                   chapter 2 ``ssd300_50.pth`` (VOC, 21)    legacy pickle, tagged cuda:0
                                 / ssd.pytorch ``ssd300_mAP_77.43_v2``     (``amdegroot_order``)
                                 / SSD512 (``size=512``), ``module.``
                                 prefixes (``data_parallel``)
write_torchvision_ssd300         ``ssd300_vgg16_coco-b556d3b4.pth`` (91)  zip, CPU tensors
write_project                    our ``vision-serve`` format              zip, CPU tensors
write_pickled_model              ``torch.save(model)`` (not a state_dict)
write_truncated                  a download cut short
==============================  ======================================  ===========================

"Tagged cuda:0" means the storages are recorded as living on ``cuda:0``, as a file saved from a
GPU is: ``torch.load`` without ``map_location`` fails on a machine without CUDA.

``width`` scales every backbone/extras channel count (``max(1, round(c * width))``; the VGG
hidden 4096 too), so ``width=1/16`` makes files of a few hundred kB whose networks run in
milliseconds. ``width=1`` is the real size (VGG16 528 MB, SSD300 100 MB).

Weights: He-normal convs, a first conv scaled down so that the SSD's 0-255 inputs keep
activations near 1, L2Norm scale 20 (the book's init). ``confident=True`` makes an SSD give a few
confident detections (a high background bias everywhere, a higher bias on a few anchor/class
channels of the three coarsest sources, small head weights) instead of thousands of near-uniform
ones.

The key tables here are written from the reference (``book-ssd.md`` 2.2, 3.2), not taken from
``models``: tests check ``models`` against them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.serialization
from torch import Tensor, nn

__all__ = [
    "BOOK_SSD_KEYS",
    "book_ssd_state_dict",
    "book_to_torchvision_keys",
    "saved_from_gpu",
    "ssd_project_dict",
    "torchvision_ssd_state_dict",
    "vgg16_state_dict",
    "vgg_project_dict",
    "write_book_ssd",
    "write_book_vgg16",
    "write_pickled_model",
    "write_project",
    "write_torchvision_ssd300",
    "write_torchvision_vgg16",
    "write_torchvision_vgg16_bn",
    "write_truncated",
]

# ----------------------------------------------------------------------------- helpers


def _c(channels: int, width: float) -> int:
    return max(1, round(channels * width))


@contextmanager
def saved_from_gpu(device: str = "cuda:0") -> Iterator[None]:
    """Inside this block ``torch.save`` records every storage as living on ``device``."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: device  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def _save(obj: Any, path: Path, *, legacy: bool, gpu: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gpu:
        with saved_from_gpu():
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class _Weights:
    """Seeded random tensors for conv / linear layers."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def conv(self, out: int, inp: int, k: int, gain: float = 1.0) -> tuple[Tensor, Tensor]:
        std = gain * math.sqrt(2.0 / (inp * k * k))  # He et al. 2015, fan_in
        w = torch.empty(out, inp, k, k).normal_(0.0, std, generator=self.g)
        b = torch.empty(out).normal_(0.0, 0.01, generator=self.g)
        return w, b

    def linear(self, out: int, inp: int) -> tuple[Tensor, Tensor]:
        w = torch.empty(out, inp).normal_(0.0, math.sqrt(2.0 / inp), generator=self.g)
        b = torch.empty(out).normal_(0.0, 0.01, generator=self.g)
        return w, b

    def bn(self, n: int) -> dict[str, Tensor]:
        return {
            "weight": 1.0 + 0.1 * torch.randn(n, generator=self.g),
            "bias": 0.1 * torch.randn(n, generator=self.g),
            "running_mean": 0.1 * torch.randn(n, generator=self.g),
            "running_var": 1.0 + 0.1 * torch.rand(n, generator=self.g),
            "num_batches_tracked": torch.tensor(1000, dtype=torch.long),
        }


# ----------------------------------------------------------------------------- VGG16

#: VGG configuration D (the paper's Table 1); "M" = 2x2 max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_state_dict(
    num_classes: int = 1000,
    width: float = 1.0,
    bn: bool = False,
    seed: int = 0,
    num_batches_tracked: bool = True,
) -> dict[str, Tensor]:
    """torchvision ``vgg16`` / ``vgg16_bn`` state_dict (keys in torchvision's order).
    ``num_batches_tracked=False`` leaves out BatchNorm's counters, as files saved before torch
    0.4.1 (torchvision's ``vgg16_bn-6c64b313.pth``) do."""
    rnd = _Weights(seed)
    sd: dict[str, Tensor] = {}
    idx, inp = 0, 3
    for v in _VGG16:
        if v == "M":
            idx += 1
            continue
        out = _c(int(v), width)
        w, b = rnd.conv(out, inp, 3)
        sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"] = w, b
        if bn:
            for name, t in rnd.bn(out).items():
                if name != "num_batches_tracked" or num_batches_tracked:
                    sd[f"features.{idx + 1}.{name}"] = t
            idx += 3
        else:
            idx += 2
        inp = out
    hidden = _c(4096, width)
    for i, (out, fan_in) in zip(
        (0, 3, 6), ((hidden, inp * 49), (hidden, hidden), (num_classes, hidden)), strict=True
    ):
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = rnd.linear(out, fan_in)
    return sd


def write_torchvision_vgg16(
    path: Path, *, num_classes: int = 1000, width: float = 1.0, seed: int = 0
) -> Path:
    """torchvision's ImageNet VGG16 file (``vgg16-397923af.pth``: 32 tensors, legacy format)."""
    return _save(vgg16_state_dict(num_classes, width, False, seed), path, legacy=True, gpu=False)


def write_torchvision_vgg16_bn(
    path: Path, *, num_classes: int = 1000, width: float = 1.0, seed: int = 0
) -> Path:
    """torchvision's ImageNet VGG16-BN file (``vgg16_bn-6c64b313.pth``: 84 tensors, no
    ``num_batches_tracked``, legacy format)."""
    sd = vgg16_state_dict(num_classes, width, True, seed, num_batches_tracked=False)
    return _save(sd, path, legacy=True, gpu=False)


def write_book_vgg16(
    path: Path,
    *,
    num_classes: int = 2,
    width: float = 1.0,
    seed: int = 0,
    gpu: bool = True,
    legacy: bool = True,
) -> Path:
    """The book's fine-tuned VGG16 (chapter 1-5): ``net.state_dict()`` with ``classifier.6`` =
    Linear(4096, num_classes), saved from ``cuda:0`` by torch 1.0 (legacy format)."""
    return _save(vgg16_state_dict(num_classes, width, False, seed), path, legacy=legacy, gpu=gpu)


# ----------------------------------------------------------------------------- SSD (book layout)

# (index in the ``vgg`` ModuleList, out channels, kernel) of the book's make_vgg() convs (2.2);
# conv6 (31) is the dilated 3x3, conv7 (33) the 1x1.
_SSD_VGG = [
    (0, 64, 3),
    (2, 64, 3),
    (5, 128, 3),
    (7, 128, 3),
    (10, 256, 3),
    (12, 256, 3),
    (14, 256, 3),
    (17, 512, 3),
    (19, 512, 3),
    (21, 512, 3),
    (24, 512, 3),
    (26, 512, 3),
    (28, 512, 3),
    (31, 1024, 3),
    (33, 1024, 1),
]
# extras: (out channels, kernel); SSD300 has 4 pairs, SSD512 a fifth (conv12, kernel 4).
_EXTRAS = {
    300: [(256, 1), (512, 3), (128, 1), (256, 3), (128, 1), (256, 3), (128, 1), (256, 3)],
    512: [(256, 1), (512, 3), (128, 1), (256, 3), (128, 1), (256, 3), (128, 1), (256, 3), (128, 1), (256, 4)],
}
# DBoxes per location of each source (book ``bbox_aspect_num``; SSD512 as the SSD paper).
_BOXES = {300: [4, 6, 6, 6, 4, 4], 512: [4, 6, 6, 6, 6, 4, 4]}
#: book-layout keys of SSD300 in the book's order (``vgg``, ``extras``, ``L2Norm``, ``loc``, ``conf``).
BOOK_SSD_KEYS: tuple[str, ...] = (
    *[f"vgg.{i}.{p}" for i, _, _ in _SSD_VGG for p in ("weight", "bias")],
    *[f"extras.{i}.{p}" for i in range(8) for p in ("weight", "bias")],
    "L2Norm.weight",
    *[f"{h}.{i}.{p}" for h in ("loc", "conf") for i in range(6) for p in ("weight", "bias")],
)


def book_ssd_state_dict(
    num_classes: int = 21,
    width: float = 1.0,
    size: int = 300,
    seed: int = 0,
    confident: bool = False,
    amdegroot_order: bool = False,
) -> dict[str, Tensor]:
    """State_dict of the book's / ssd.pytorch's SSD (``vgg.*``, ``extras.*``, ``L2Norm.weight``,
    ``loc.*``, ``conf.*``). ``amdegroot_order`` puts ``L2Norm.weight`` before ``extras`` as
    ssd.pytorch's file does; the keys and shapes are the same."""
    rnd = _Weights(seed)
    vgg: dict[str, Tensor] = {}
    inp = 3
    for idx, out, k in _SSD_VGG:
        out = _c(out, width)
        # 0-255 inputs: scale conv1_1 down so activations stay near 1
        gain = 1 / 128 if idx == 0 else 1.0
        vgg[f"vgg.{idx}.weight"], vgg[f"vgg.{idx}.bias"] = rnd.conv(out, inp, k, gain=gain)
        inp = out
    extras: dict[str, Tensor] = {}
    sources = [_c(512, width), _c(1024, width)]
    for i, (out, k) in enumerate(_EXTRAS[size]):
        out = _c(out, width)
        extras[f"extras.{i}.weight"], extras[f"extras.{i}.bias"] = rnd.conv(out, inp, k)
        inp = out
        if i % 2 == 1:
            sources.append(out)
    l2 = {"L2Norm.weight": 20.0 + torch.randn(_c(512, width), generator=rnd.g)}
    loc: dict[str, Tensor] = {}
    conf: dict[str, Tensor] = {}
    for s, (ch, n) in enumerate(zip(sources, _BOXES[size], strict=True)):
        w, b = rnd.conv(n * 4, ch, 3, gain=0.3)
        loc[f"loc.{s}.weight"], loc[f"loc.{s}.bias"] = w, b
        w, b = rnd.conv(n * num_classes, ch, 3, gain=0.5)
        if confident:
            w, b = w * 0.5, _confident_bias(s, n, num_classes, len(sources))
        conf[f"conf.{s}.weight"], conf[f"conf.{s}.bias"] = w, b
    parts = [vgg, l2, extras] if amdegroot_order else [vgg, extras, l2]
    return {k: v for part in [*parts, loc, conf] for k, v in part.items()}


def _confident_bias(source: int, boxes: int, num_classes: int, num_sources: int) -> Tensor:
    """conf bias for one source: background logit 6, and logit 11 on a few (anchor, class)
    channels of the three coarsest sources (channel = anchor * num_classes + class)."""
    bias = torch.zeros(boxes, num_classes)  # (A, K), flattened to channel a*K + k
    bias[:, 0] = 6.0
    # source: (anchor, class)
    picks = {num_sources - 3: (1, 1), num_sources - 2: (0, 2), num_sources - 1: (2, 3)}
    if source in picks:
        anchor, cls = picks[source]
        bias[anchor, min(cls, num_classes - 1)] = 11.0
    return bias.flatten()


def book_to_torchvision_keys(key: str) -> str:
    """torchvision ``ssd300_vgg16`` name of a book-layout SSD300 key (reference 3.2)."""
    head, rest = key.split(".", 1)
    if head == "L2Norm":
        return "backbone.scale_weight"
    if head in ("loc", "conf"):
        name = "regression_head" if head == "loc" else "classification_head"
        return f"head.{name}.module_list.{rest}"
    idx, param = rest.split(".")
    i = int(idx)
    if head == "extras":
        return f"backbone.extra.{i // 2 + 1}.{(i % 2) * 2}.{param}"
    if i <= 21:
        return f"backbone.features.{i}.{param}"
    if i in (24, 26, 28):
        return f"backbone.extra.0.{i - 23}.{param}"
    return f"backbone.extra.0.7.{ {31: 1, 33: 3}[i] }.{param}"


def torchvision_ssd_state_dict(
    num_classes: int = 91, width: float = 1.0, seed: int = 0, confident: bool = False
) -> dict[str, Tensor]:
    """torchvision ``ssd300_vgg16`` state_dict, in torchvision's key order (``scale_weight``
    first, the classification head before the regression head)."""
    book = book_ssd_state_dict(num_classes, width, 300, seed, confident)
    tv = {book_to_torchvision_keys(k): v for k, v in book.items()}
    order = [
        "backbone.scale_weight",
        *(k for k in tv if k.startswith("backbone.f")),
        *(k for k in tv if k.startswith("backbone.e")),
        *(k for k in tv if ".classification" in k),
        *(k for k in tv if ".regression" in k),
    ]
    return {k: tv[k] for k in order}


def write_book_ssd(
    path: Path,
    *,
    num_classes: int = 21,
    width: float = 1.0,
    size: int = 300,
    seed: int = 0,
    confident: bool = False,
    data_parallel: bool = False,
    amdegroot_order: bool = False,
    gpu: bool = True,
    legacy: bool = True,
) -> Path:
    """The book's ``ssd300_50.pth`` / ssd.pytorch's ``ssd300_mAP_77.43_v2.pth``: a plain
    state_dict saved from ``cuda:0`` (legacy format). ``data_parallel`` adds ``module.``
    prefixes as ``nn.DataParallel(net).state_dict()`` does."""
    sd = book_ssd_state_dict(num_classes, width, size, seed, confident, amdegroot_order)
    if data_parallel:
        sd = {f"module.{k}": v for k, v in sd.items()}
    return _save(sd, path, legacy=legacy, gpu=gpu)


def write_torchvision_ssd300(
    path: Path, *, num_classes: int = 91, width: float = 1.0, seed: int = 0, confident: bool = False
) -> Path:
    """torchvision's ``ssd300_vgg16_coco-b556d3b4.pth`` (91 classes, zip format, CPU)."""
    sd = torchvision_ssd_state_dict(num_classes, width, seed, confident)
    return _save(sd, path, legacy=False, gpu=False)


# ----------------------------------------------------------------------------- project format


def ssd_project_dict(
    labels: Sequence[str], *, width: float = 1.0, size: int = 300, seed: int = 0, confident: bool = False
) -> dict[str, Any]:
    """A ``vision-serve`` version 1 detector checkpoint with the book's default boxes and
    post-processing, as training writes it (only plain types and tensors)."""
    # the book's ssd_cfg (2-8 nb#5) and the SSD paper's 512 model
    boxes: dict[str, Any] = {
        300: {
            "feature_maps": [38, 19, 10, 5, 3, 1],
            "steps": [8, 16, 32, 64, 100, 300],
            "min_sizes": [30, 60, 111, 162, 213, 264],
            "max_sizes": [60, 111, 162, 213, 264, 315],
            "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        },
        512: {
            "feature_maps": [64, 32, 16, 8, 4, 2, 1],
            "steps": [8, 16, 32, 64, 128, 256, 512],
            "min_sizes": [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8],
            "max_sizes": [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6],
            "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
        },
    }[size]
    # extras as [mid, out, kernel, stride, padding] per pair of convs
    extras = [[256, 512, 3, 2, 1], [128, 256, 3, 2, 1]] + (
        [[128, 256, 3, 1, 0]] * 2 if size == 300 else [[128, 256, 3, 2, 1]] * 2 + [[128, 256, 4, 1, 1]]
    )
    return {
        "format": "vision-serve",
        "version": 1,
        "task": "detect",
        "arch": f"ssd{size}",
        "arch_args": {
            "num_classes": len(labels) + 1,
            "width": width,
            "ssd_config": {
                "name": f"SSD{size}_VOC",
                "input_size": size,
                **boxes,
                "variances": [0.1, 0.2],
                "clamp_centres": True,
                "extras": extras,
            },
        },
        "labels": list(labels),
        "preprocess": {"kind": "ssd", "size": size},
        "postprocess": {"semantics": "book", "class_offset": 1},
        "state_dict": book_ssd_state_dict(len(labels) + 1, width, size, seed, confident),
        "metadata": {"written_by": "tests/checkpoint_factory.py", "seed": seed},
    }


def vgg_project_dict(
    labels: Sequence[str],
    *,
    width: float = 1.0,
    bn: bool = False,
    seed: int = 0,
    resize: int = 224,
    crop: int = 224,
) -> dict[str, Any]:
    """A ``vision-serve`` version 1 classifier checkpoint."""
    return {
        "format": "vision-serve",
        "version": 1,
        "task": "classify",
        "arch": "vgg16_bn" if bn else "vgg16",
        "arch_args": {"num_classes": len(labels), "width": width},
        "labels": list(labels),
        "preprocess": {"kind": "classifier", "resize": resize, "crop": crop},
        "postprocess": {},
        "state_dict": vgg16_state_dict(len(labels), width, bn, seed),
        "metadata": {"written_by": "tests/checkpoint_factory.py", "seed": seed},
    }


def write_project(path: Path, checkpoint: dict[str, Any]) -> Path:
    """Save a dict from :func:`ssd_project_dict` / :func:`vgg_project_dict` (zip format)."""
    return _save(checkpoint, path, legacy=False, gpu=False)


# ----------------------------------------------------------------------------- broken files


def write_pickled_model(path: Path) -> Path:
    """``torch.save(model)``: a pickled nn.Module, which ``weights_only=True`` refuses."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    return _save(model, path, legacy=False, gpu=False)


def write_truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of ``source``'s bytes, like an interrupted download."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * keep)])
    return path
