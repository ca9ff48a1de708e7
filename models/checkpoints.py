"""Checkpoint files: read them safely, recognise their layout, check them, build the network.

Reading: :func:`read_checkpoint` verifies the SHA-256 (if given) BEFORE unpickling, then calls
``torch.load(path, map_location=..., weights_only=True)``: tensors and plain containers only, never
code. Files saved from a GPU load on the CPU through ``map_location``.

Layouts :func:`detect_layout` recognises from the keys (``module.`` prefixes from
``nn.DataParallel`` removed; a state_dict wrapped as ``{"state_dict" | "model" | "model_state_dict":
...}`` by a training script unwrapped):

============== ============================================================ =====================
layout          keys                                                         models-file format
============== ============================================================ =====================
ssd.pytorch     ``vgg.N.*``, ``extras.N.*``, ``L2Norm.weight``, ``loc.N.*``,  ``ssd.pytorch``
                ``conf.N.*`` (the book's chapter 2, amdegroot's ssd.pytorch)
torchvision-ssd ``backbone.*``, ``head.*`` (torchvision ``ssd300_vgg16``)     ``torchvision``
vgg             ``features.N.*``, ``classifier.{0,3,6}.*``                   ``torchvision`` /
vgg_bn          the same with BatchNorm (``features.1.running_mean``)         ``state_dict``
project         ``{"format": "vision-serve", "version": 1, ...}``             ``project``
============== ============================================================ =====================

``format = "auto"`` picks the format from the layout: an SSD layout gives its format; a VGG with
1000 outputs is taken as torchvision's ImageNet file (resize 256, crop 224, ImageNet names); any
other VGG as the book's chapter 1 state_dict (resize 224, crop 224, labels from the models file).

What each format means for a detector:

- ``ssd.pytorch`` (and project files written from it): the book's default boxes (``SSD300_VOC`` /
  ``SSD512_VOC``, centre clamp included), the book's post-processing (``BOOK_POSTPROCESS``), labels
  WITHOUT background (network class c is ``labels[c - 1]``);
- ``torchvision``: the weights are renamed into our SSD (``torchvision_to_book``) and run with
  torchvision's anchors (``SSD300_COCO``) and post-processing (``TORCHVISION_POSTPROCESS``); labels
  include background at 0 (class id = network class = COCO category id); 91 classes default to
  ``COCO_CATEGORIES``.

The project format (nothing executable: plain types and tensors, so ``weights_only`` reads it)::

    {"format": "vision-serve", "version": 1,
     "task": "classify" | "detect",
     "arch": "vgg16" | "vgg16_bn" | "ssd300" | "ssd512",
     "arch_args": {"num_classes": int, "width": float,
                   # detectors: the default boxes (and extras) the weights were trained with
                   "ssd_config": {"name": "SSD300_VOC", "input_size": 300, "feature_maps": [...], ...}},
     "labels": [str, ...],                 # classify: num_classes; detect: see class_offset
     "preprocess": {"kind": "classifier", "resize": 224, "crop": 224} | {"kind": "ssd", "size": 300},
     "postprocess": {} | {"semantics": "book" | "torchvision", "class_offset": 1 | 0,
                          "config": {PostprocessConfig fields}},
     "state_dict": {...},                  # our modules' keys: VGG = torchvision's, SSD = the book's
     "metadata": {...}}                    # free-form plain data (training run, dataset, ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.anchors import default_boxes
from models.detect import BOOK_POSTPROCESS, TORCHVISION_POSTPROCESS, PostprocessConfig
from models.errors import CheckpointError, ModelConfigError
from models.labels import COCO_CATEGORIES, IMAGENET_CATEGORIES
from models.preprocess import (
    BOOK_CLASSIFIER_PRESET,
    TORCHVISION_CLASSIFIER_PRESET,
    ClassifierTransform,
    SSDTransform,
)
from models.ssd import (
    SSD,
    SSD300_COCO,
    SSD300_VOC,
    SSD512_VOC,
    ExtraBlock,
    SSDConfig,
    book_to_torchvision,
    torchvision_to_book,
)
from models.types import ARCHS, ModelSpec, Task
from models.vgg import VGG_BUILDERS

__all__ = [
    "PROJECT_FORMAT",
    "PROJECT_VERSION",
    "BuiltModel",
    "KeyProblem",
    "StateDictFit",
    "build_model",
    "checked_fit",
    "detect_layout",
    "fit_state_dict",
    "project_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "resolve_format",
    "save_project_checkpoint",
    "sha256_file",
    "unwrap_state_dict",
]

PROJECT_FORMAT = "vision-serve"
PROJECT_VERSION = 1
#: keys under which training scripts commonly nest the state_dict
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_NAMED_SSD_CONFIGS = {"SSD300_VOC": SSD300_VOC, "SSD300_COCO": SSD300_COCO, "SSD512_VOC": SSD512_VOC}
_NAMED_POSTPROCESS = {"book": BOOK_POSTPROCESS, "torchvision": TORCHVISION_POSTPROCESS}
_LAYOUT_WORDS = {
    "ssd.pytorch": "the book's / ssd.pytorch SSD layout (vgg.*, extras.*, L2Norm.weight, loc.*, conf.*)",
    "torchvision-ssd": "torchvision's SSD layout (backbone.*, head.*)",
    "vgg": "torchvision's VGG16 layout (features.*, classifier.*)",
    "vgg_bn": "torchvision's VGG16-BN layout (features.* with BatchNorm, classifier.*)",
    "project": "the vision-serve project format",
}
_FORMAT_FOR_LAYOUT = {"ssd.pytorch": "ssd.pytorch", "torchvision-ssd": "torchvision", "project": "project"}


# --------------------------------------------------------------------------------------------- reading


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_size`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path.absolute()}; fix the path or fetch the file")
    if not path.is_file():
        raise CheckpointError(f"weights path is not a file: {path.absolute()}; point it at a .pth file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"weights file is not readable: {path.absolute()}; check its permissions")


def read_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", expected_sha256: str | None = None
) -> tuple[Any, str]:
    """Load a checkpoint file as data: -> (the loaded object, the file's SHA-256).

    The SHA-256 is computed (and compared with ``expected_sha256``, if given) before unpickling.
    Raises CheckpointError for a missing or unreadable file, a hash mismatch, and a file torch
    cannot read, saying which kind it is: empty, not a checkpoint at all (random bytes, a web page),
    a zip that is not torch's, truncated or corrupt, a plain ``pickle.dump``, or an object
    ``weights_only`` refuses (e.g. ``torch.save(model)``).
    """
    path = Path(path)
    _check_file(path)
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path.absolute()}: {e.strerror or e}") from e
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise CheckpointError(
            f"SHA-256 mismatch for {path}: the file has {digest}, but {expected_sha256.strip()} is expected; "
            "the file is damaged or not the one meant: replace it, or update sha256 if the new file is right"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure to read the file becomes one clear message
        if "CUDA" in str(e) and not isinstance(e, pickle.UnpicklingError):
            # only when the caller passed a cuda map_location without a GPU
            raise CheckpointError(f"cannot load {path} onto {map_location}: {e}") from None
        raise _unreadable(path, e) from None
    return obj, digest


#: how torch.save files begin: a zip archive (torch >= 1.6), or pickles of which the first holds
#: torch's magic number (the legacy format)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_HEAD_BYTES = 64


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """The CheckpointError for a file ``torch.load(weights_only=True)`` failed on, told from the
    file's first bytes and the error: empty, not a checkpoint at all, a zip that is not torch's, a
    zip or legacy file cut short, a plain pickle, a pickled object, a legacy pickle protocol."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        return CheckpointError(f"cannot read weights file {path}: {e.strerror or e}")
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    if not head:
        return CheckpointError(
            f"{path} is empty (0 bytes), not a PyTorch checkpoint; download or copy it again"
        )
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(path)
        if names is None:
            return CheckpointError(
                f"{path} is a zip archive cut short or damaged (its table of contents, at the end, cannot "
                "be read): truncated or corrupt; download or copy it again"
            )
        if not any(name.endswith("/data.pkl") for name in names):
            return CheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint: it holds {_listing(names, 3)}, "
                "not the .../data.pkl that torch.save writes; point the models file at the .pth file itself"
            )
    elif len(head) >= 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        if _LEGACY_MAGIC not in head:
            what = f"{path} is a plain Python pickle (pickle.dump), not a file written by torch.save"
            if refused:
                what += (
                    f", and it refers to {refused.group(1)}, refused because unpickling objects can run code"
                )
            return CheckpointError(f"{what}; save the weights with torch.save(model.state_dict(), path)")
        if not refused and head[1] > 2 and "Unsupported operand" in str(error):
            return CheckpointError(
                f"{path} is a legacy-format torch.save file written with pickle protocol {head[1]}, which "
                "the safe loader (weights_only) cannot read; save it again with torch.save(state_dict, path) "
                "and the default settings"
            )
    else:
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (before torch 1.6, a "
            f"pickle), and this file is neither{_text_hint(head)}; check that the path names the weights file"
        )
    if refused:
        return CheckpointError(
            f"{path} holds a pickled Python object (e.g. torch.save(model)), not a state_dict; "
            f"save model.state_dict() instead and load that (refused: {refused.group(1)}). Objects are "
            "refused because unpickling them can run code"
        )
    return _corrupt(path, error)


def _zip_names(path: Path) -> list[str] | None:
    """The names in a zip archive, or None when its table of contents cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except Exception:  # zipfile raises several kinds on damaged archives; all mean "unreadable"
        return None


def _text_hint(head: bytes) -> str:
    """``" (it starts with text: ...)"`` when ``head`` reads as text, e.g. an error page saved
    in place of the file; else nothing."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if not text.strip() or not all(c.isprintable() or c.isspace() for c in text):
        return ""
    return f" (it starts with text: {' '.join(text.split())[:40]!r}, perhaps a web page saved in its place)"


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    text = str(e).strip()
    detail = f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(e).__name__
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint (truncated or corrupt? {detail}); "
        "download or copy it again"
    )


def unwrap_state_dict(obj: Any, path: str | os.PathLike[str] = "the checkpoint") -> dict[str, Tensor]:
    """The state_dict inside a loaded checkpoint: the dict itself, or the one nested under
    ``state_dict`` / ``model`` / ``model_state_dict``; ``module.`` prefixes removed.
    Raises CheckpointError when it is not a mapping of names to tensors."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty dict" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds {kind}, not a state_dict (a dict of parameter names to tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a state_dict: {_listing([str(k) for k in not_tensors])} are not tensors; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return {_strip_module(str(k)): v for k, v in obj.items()}


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def read_state_dict(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", expected_sha256: str | None = None
) -> dict[str, Tensor]:
    """:func:`read_checkpoint` then :func:`unwrap_state_dict` (a project file gives its state_dict)."""
    obj, _ = read_checkpoint(path, map_location, expected_sha256)
    return unwrap_state_dict(obj, path)


def _is_project(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == PROJECT_FORMAT


def detect_layout(obj: Any) -> str:
    """Layout of a loaded checkpoint: "project", "ssd.pytorch", "torchvision-ssd", "vgg", "vgg_bn",
    "ssd-vgg-base" (the SSD's training start point ``vgg16_reducedfc.pth``, keys ``0.weight`` ...),
    or "unknown". Accepts the loaded object or a state_dict (``module.`` prefixes allowed)."""
    if _is_project(obj):
        return "project"
    if not isinstance(obj, Mapping):
        return "unknown"
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointError:
        return "unknown"
    keys = set(sd)
    if "L2Norm.weight" in keys or any(k.startswith(("vgg.", "extras.", "loc.", "conf.")) for k in keys):
        return "ssd.pytorch"
    if "backbone.scale_weight" in keys or any(k.startswith(("backbone.", "head.")) for k in keys):
        return "torchvision-ssd"
    if "features.0.weight" in keys and any(k.startswith("classifier.") for k in keys):
        return "vgg_bn" if "features.1.running_mean" in keys else "vgg"
    if "0.weight" in keys and "33.weight" in keys:
        return "ssd-vgg-base"
    return "unknown"


def _listing(items: Sequence[str], shown: int = 4) -> str:
    head = ", ".join(items[:shown])
    return head + (f" (and {len(items) - shown} more)" if len(items) > shown else "")


# --------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class KeyProblem:
    """A tensor that does not fit a network: missing (``found`` is None), not one of the network's
    (``expected`` is None), or of the wrong shape."""

    key: str
    found: tuple[int, ...] | None
    expected: tuple[int, ...] | None


@dataclass(frozen=True)
class StateDictFit:
    """The network a state_dict describes best, and the tensors that do not fit it.

    ``arch``: "vgg16", "vgg16_bn", "ssd300" or "ssd512". ``matched``: tensors with the network's
    name and shape; ``problems``: the others, in the network's key order, then the file's keys the
    network does not have (empty: a perfect fit). ``alternative``: another network that fits as many tensors,
    when the file cannot tell the two apart (then one of its broken tensors is in each list).
    """

    arch: str
    num_classes: int
    width: float
    matched: int
    problems: tuple[KeyProblem, ...]
    alternative: StateDictFit | None = None


#: how many of the most common readings of the width and of the class count are tried
_READINGS_TRIED = 3
_CONF_KEY = re.compile(r"^conf\.(\d+)\.(?:weight|bias)$")
_HEAD_KEY = re.compile(r"^(?:loc|conf)\.(\d+)\.")
_RUNNING_MEAN = re.compile(r"^features\.\d+\.running_mean$")


def fit_state_dict(sd: Mapping[str, Tensor], family: Literal["vgg", "ssd"]) -> StateDictFit:
    """The VGG16 / VGG16-BN (``family="vgg"``, torchvision's keys) or SSD300 / SSD512 (``"ssd"``,
    the book's keys) that most tensors of ``sd`` describe, and the tensors that do not fit it.

    Width and class count are read from every tensor that shows them (each backbone layer's output
    channels against the full-size network's, each class head's rows) and the most common readings
    are tried, so one broken tensor cannot make the others look wrong. Raises ValueError, in plain
    words, when no tensor shows the width or the class count.
    """
    fits = _vgg_fits(sd) if family == "vgg" else _ssd_fits(sd)
    best = fits[0]
    if best.problems:
        fits.sort(key=lambda fit: (-fit.matched, len(fit.problems)))  # stable: the likeliest first
        best = fits[0]
        rival = next(
            (f for f in fits[1:] if (f.matched, len(f.problems)) == (best.matched, len(best.problems))), None
        )
        if rival is not None:
            best = dataclasses.replace(best, alternative=rival)
    return best


def _compare(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[int, tuple[KeyProblem, ...]]:
    """(tensors of ``sd`` that fit ``expected`` by name and shape, the problems of the others)."""
    matched, problems = 0, []
    for key, want in expected.items():
        got = sd.get(key)
        if got is None:
            # files older than torch 0.4.1 (torchvision's vgg16_bn) lack BatchNorm's
            # num_batches_tracked, which load_state_dict fills in
            if not key.endswith(".num_batches_tracked"):
                problems.append(KeyProblem(key, None, tuple(want.shape)))
        elif got.shape == want.shape:
            matched += 1
        else:
            problems.append(KeyProblem(key, tuple(got.shape), tuple(want.shape)))
    problems += [KeyProblem(key, tuple(t.shape), None) for key, t in sd.items() if key not in expected]
    return matched, tuple(problems)


def _meta_state_dict(build: Callable[[], nn.Module]) -> dict[str, Tensor]:
    with torch.device("meta"):  # shapes only, no memory
        return build().state_dict()


def _width_readings(sd: Mapping[str, Tensor], full: Mapping[str, Tensor], keys: Iterable[str]) -> list[float]:
    """The most common widths ``keys`` show: their output channels in ``sd`` over the full-size
    network's (``full``)."""
    readings: Counter[float] = Counter()
    for key in keys:
        got, ref = sd.get(key), full.get(key)
        if got is not None and ref is not None and got.dim() >= 1 and ref.dim() >= 1 and got.shape[0] > 0:
            readings[got.shape[0] / ref.shape[0]] += 1
    return [value for value, _ in readings.most_common(_READINGS_TRIED)]


def _ssd_fits(sd: Mapping[str, Tensor]) -> list[StateDictFit]:
    heads = 1 + max((int(m.group(1)) for k in sd if (m := _HEAD_KEY.match(k))), default=-1)
    configs = sorted((SSD300_VOC, SSD512_VOC), key=lambda c: len(c.feature_maps) != heads)
    full: dict[str, Tensor] = {}
    for config in configs:  # backbone and extras keys: the same channels in both where both have them
        full.update(_meta_state_dict(partial(SSD, 2, config, 1.0)))
    widths = _width_readings(sd, full, [k for k in full if k.startswith(("vgg.", "extras.", "L2Norm."))])
    readings: Counter[int] = Counter()
    for key, tensor in sd.items():
        m = _CONF_KEY.match(key)
        if m is None or tensor.dim() < 1:
            continue
        source, rows = int(m.group(1)), tensor.shape[0]
        boxes = {c.boxes_per_location[source] for c in configs if source < len(c.boxes_per_location)}
        readings.update({rows // n for n in boxes if rows % n == 0 and rows // n >= 2})
    classes = [value for value, _ in readings.most_common(_READINGS_TRIED)]
    if not widths:
        raise ValueError("no backbone tensor (vgg.N.*, extras.N.*, L2Norm.weight) shows the network's width")
    if not classes:
        raise ValueError("no class head tensor (conf.N.weight / conf.N.bias) shows the number of classes")
    fits = []
    for config in configs:
        for width in widths:
            for num_classes in classes:
                expected = _meta_state_dict(partial(SSD, num_classes, config, width))
                matched, problems = _compare(sd, expected)
                fits.append(StateDictFit(f"ssd{config.input_size}", num_classes, width, matched, problems))
                if not problems:
                    return [fits[-1]]
    return fits


def _vgg_fits(sd: Mapping[str, Tensor]) -> list[StateDictFit]:
    has_bn = any(_RUNNING_MEAN.match(k) for k in sd)
    readings = Counter(
        int(t.shape[0])
        for k in ("classifier.6.weight", "classifier.6.bias")
        if (t := sd.get(k)) is not None and t.dim() >= 1 and t.shape[0] > 0
    )
    classes = [value for value, _ in readings.most_common(_READINGS_TRIED)]
    if not classes:
        raise ValueError(
            "classifier.6.weight and classifier.6.bias, the last layer, are both missing, "
            "so the number of classes cannot be read"
        )
    fits = []
    for arch in ("vgg16_bn", "vgg16") if has_bn else ("vgg16", "vgg16_bn"):
        build = VGG_BUILDERS[arch]
        full = _meta_state_dict(partial(build, num_classes=1, width=1.0))
        widths = _width_readings(sd, full, [k for k in full if not k.startswith("classifier.6.")])
        for width in widths:
            for num_classes in classes:
                expected = _meta_state_dict(partial(build, num_classes=num_classes, width=width))
                matched, problems = _compare(sd, expected)
                fits.append(StateDictFit(arch, num_classes, width, matched, problems))
                if not problems:
                    return [fits[-1]]
    if not fits:
        raise ValueError("no features.N / classifier.N tensor shows the network's width")
    return fits


def _problem_words(problems: Sequence[KeyProblem], name: Callable[[str], str] = str) -> str:
    """The problems in words, the wrong shapes first; ``name`` gives a key as the file spells it."""
    wrong = [p for p in problems if p.found is not None and p.expected is not None]
    missing = [p for p in problems if p.found is None]
    unexpected = [p for p in problems if p.expected is None]
    parts = []
    if wrong:
        shapes = [
            f"{name(p.key)} has shape {list(p.found or ())}, expected {list(p.expected or ())}" for p in wrong
        ]
        parts.append(f"{len(wrong)} with the wrong shape: {_listing(shapes, 3)}")
    if missing:
        parts.append(
            f"{len(missing)} missing: "
            + _listing([f"{name(p.key)} (expected shape {list(p.expected or ())})" for p in missing])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected: "
            + _listing([f"{name(p.key)} (shape {list(p.found or ())})" for p in unexpected])
        )
    return "; ".join(parts)


def _fit(path: Path, sd: Mapping[str, Tensor], family: Literal["vgg", "ssd"], layout: str) -> StateDictFit:
    try:
        return fit_state_dict(sd, family)
    except ValueError as e:
        raise CheckpointError(f"{path} is in {layout}, but {e}") from None


def checked_fit(path: Path, sd: Mapping[str, Tensor], family: Literal["vgg", "ssd"]) -> StateDictFit:
    """:func:`fit_state_dict`, for a state_dict that must fit its network exactly (VGG in
    torchvision's keys, SSD in the book's). Raises CheckpointError naming the tensors that do not."""
    fit = _fit(path, sd, family, _LAYOUT_WORDS["vgg" if family == "vgg" else "ssd.pytorch"])
    _check_fit(path, fit, len(sd), f"a {fit.num_classes}-class {fit.arch} of width {fit.width:g}")
    return fit


def _check_fit(
    path: Path, fit: StateDictFit, total: int, what: str, name: Callable[[str], str] = str
) -> None:
    """CheckpointError naming the tensors that do not fit ``fit``'s network (``what``), if any."""
    if not fit.problems:
        return
    message = (
        f"{path} does not fit {what}, the network {fit.matched} of its {total} tensors describe: "
        f"{_problem_words(fit.problems, name)}"
    )
    other = fit.alternative
    if other is not None:
        message += (
            f"; or, if it is a {other.num_classes}-class {other.arch} of width {other.width:g}: "
            f"{_problem_words(other.problems, name)}"
        )
    raise CheckpointError(
        message + ". The rest of the file fits that network, so the file was saved from a modified network, "
        "or edited or damaged since"
    )


def _check_keys(path: Path, sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    """CheckpointError naming the missing / unexpected / mis-shaped keys of ``sd`` against ``expected``."""
    _, problems = _compare(sd, expected)
    if problems:
        raise CheckpointError(
            f"{path} does not fit {what}: {_problem_words(problems)}. "
            "Check that the file and the models file's arch/format describe the same network"
        )


# --------------------------------------------------------------------------------------------- building


@dataclass
class BuiltModel:
    """A network with its checkpoint's weights (float32, eval mode, on the loading device) and its use.

    ``format`` is the resolved format (never "auto"). Detectors also carry ``ssd_config`` (their
    default boxes), ``priors`` (FloatTensor[A, 4] cxcywh), ``postprocess`` and ``class_offset``
    (network class c is ``labels[c - class_offset]``).
    """

    model: nn.Module
    task: Task
    arch: str
    format: str
    labels: list[str]
    transform: ClassifierTransform | SSDTransform
    width: float
    sha256: str
    ssd_config: SSDConfig | None = None
    priors: Tensor | None = None
    postprocess: PostprocessConfig | None = None
    class_offset: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_model(spec: ModelSpec, map_location: str | torch.device = "cpu") -> BuiltModel:
    """Read ``spec.weights`` and build the network it describes, checked against ``spec``.

    Raises ModelConfigError for a bad spec (unknown arch / format, wrong labels count) and
    CheckpointError for a file that cannot serve it (see the module docstring for the layouts).
    The model is in eval mode, float32, on ``map_location``.
    """
    path = Path(spec.weights)
    obj, digest = read_checkpoint(path, map_location, spec.sha256)
    layout = detect_layout(obj)
    if layout == "unknown":
        keys = list(unwrap_state_dict(obj, path))
        raise CheckpointError(
            f"{path} is a state_dict this service does not know (first keys: {_listing(keys, 3)}); "
            "supported: torchvision VGG16 / VGG16-BN, the book's / ssd.pytorch SSD, torchvision's SSD300, "
            "and vision-serve project files"
        )
    if layout == "ssd-vgg-base":
        raise CheckpointError(
            f"{path} is the VGG16 base an SSD starts training from (vgg16_reducedfc.pth: keys 0.weight .. "
            "33.bias, no detection heads); serve a trained SSD checkpoint instead"
        )
    fmt = resolve_format(spec, path, obj, layout)
    if fmt == "project":
        built = _build_project(spec, path, obj)
    elif spec.task == "classify":
        built = _build_classifier(spec, path, unwrap_state_dict(obj, path), fmt)
    else:
        built = _build_detector(spec, path, unwrap_state_dict(obj, path), fmt)
    built.sha256 = digest
    built.model.to(map_location).eval()
    if built.priors is not None:
        built.priors = built.priors.to(map_location)
    return built


def resolve_format(spec: ModelSpec, path: Path, obj: Any, layout: str) -> str:
    """The format to read ``obj`` (of ``layout``) with: ``spec.format``, or the detected one for
    "auto". Raises CheckpointError when the file's task or layout disagrees with ``spec``."""
    layout_task = "classify" if layout.startswith("vgg") else "detect"
    if layout == "project":
        layout_task = obj.get("task")
    if layout_task != spec.task:
        raise CheckpointError(
            f"{path} holds a {'detector' if layout_task == 'detect' else 'classifier'} in "
            f"{_LAYOUT_WORDS[layout]}, but the models file says task = {spec.task!r} (arch = {spec.arch!r})"
        )
    if spec.format == "auto":
        if layout in _FORMAT_FOR_LAYOUT:
            return _FORMAT_FOR_LAYOUT[layout]
        fit = _fit(path, unwrap_state_dict(obj, path), "vgg", _LAYOUT_WORDS[layout])
        return "torchvision" if fit.num_classes == 1000 else "state_dict"
    allowed = {
        "ssd.pytorch": ("ssd.pytorch",),
        "torchvision-ssd": ("torchvision",),
        "vgg": ("torchvision", "state_dict"),
        "vgg_bn": ("torchvision", "state_dict"),
        "project": ("project",),
    }[layout]
    if spec.format not in allowed:
        raise CheckpointError(
            f"{path} is in {_LAYOUT_WORDS[layout]}, but the models file says format = {spec.format!r}; "
            f"use format = {allowed[0]!r}" + (' (or "auto")' if layout != "project" else "")
        )
    return spec.format


def _labels(
    spec: ModelSpec,
    path: Path,
    expected: int,
    what: str,
    default: Sequence[str] | None,
    background_note: str = "",
) -> list[str]:
    if spec.labels is None:
        if default is not None and len(default) == expected:
            return list(default)
        raise ModelConfigError(
            f"model {spec.name!r}: {path} is {what}; the models file must give its {expected} labels"
            f"{background_note} (labels = [...] or labels_file)"
        )
    if len(spec.labels) != expected:
        raise ModelConfigError(
            f"model {spec.name!r}: {path} is {what}, but the models file gives {len(spec.labels)} labels; "
            f"give {expected}{background_note}"
        )
    return list(spec.labels)


def _load_into(path: Path, model: nn.Module, sd: Mapping[str, Tensor], what: str) -> nn.Module:
    """Check ``sd`` against ``model``'s keys and shapes, then load it (assigning the tensors)."""
    _check_keys(path, sd, model.state_dict(), what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float()


def _build_classifier(spec: ModelSpec, path: Path, sd: dict[str, Tensor], fmt: str) -> BuiltModel:
    fit = _fit(path, sd, "vgg", _LAYOUT_WORDS["vgg"])
    what = f"a {fit.num_classes}-class {fit.arch} in torchvision's VGG layout"
    if fit.arch != spec.arch:
        bn = fit.arch == "vgg16_bn"
        hint = "it has BatchNorm layers (features.1.running_mean)" if bn else "it has no BatchNorm layers"
        raise CheckpointError(
            f"{path} is {what}: {hint}, but the models file says arch = {spec.arch!r}; "
            f"use arch = {fit.arch!r}"
        )
    _check_fit(path, fit, len(sd), f"a {fit.num_classes}-class {fit.arch} of width {fit.width:g}")
    with torch.device("meta"):
        model = VGG_BUILDERS[fit.arch](num_classes=fit.num_classes, width=fit.width)
    _load_into(path, model, sd, f"a {fit.num_classes}-class {fit.arch} of width {fit.width:g}")
    if fmt == "torchvision":
        default_labels: Sequence[str] | None = IMAGENET_CATEGORIES
        resize, crop = TORCHVISION_CLASSIFIER_PRESET
    else:
        default_labels = None
        resize, crop = BOOK_CLASSIFIER_PRESET
    labels = _labels(spec, path, fit.num_classes, what, default_labels)
    transform = ClassifierTransform(spec.resize or resize, spec.crop or crop)
    return BuiltModel(model, "classify", fit.arch, fmt, labels, transform, fit.width, sha256="")


def _build_detector(spec: ModelSpec, path: Path, sd: dict[str, Tensor], fmt: str) -> BuiltModel:
    layout_words = _LAYOUT_WORDS["ssd.pytorch" if fmt == "ssd.pytorch" else "torchvision-ssd"]
    name: Callable[[str], str] = str
    if fmt == "torchvision":
        try:
            sd = torchvision_to_book(sd)
        except ValueError as e:
            raise CheckpointError(f"{path} is not a torchvision ssd300_vgg16 state_dict: {e}") from None
        name = _torchvision_name  # messages name the keys as the file spells them
    fit = _fit(path, sd, "ssd", layout_words)
    size = SSD512_VOC.input_size if fit.arch == "ssd512" else SSD300_VOC.input_size
    short = "ssd.pytorch layout" if fmt == "ssd.pytorch" else "torchvision's layout"
    what = f"a {fit.num_classes}-class SSD{size} in {short}"
    if fit.arch != spec.arch:
        raise CheckpointError(
            f"{path} is {what} ({size}x{size} input, {6 if size == 300 else 7} detection "
            f"sources), but the models file says arch = {spec.arch!r}; use arch = {fit.arch!r}"
        )
    _check_fit(
        path, fit, len(sd), f"a {fit.num_classes}-class SSD{size} of width {fit.width:g} ({short})", name
    )
    if fmt == "torchvision":
        if size != 300:
            raise CheckpointError(f'{path}: torchvision has no SSD{size}; use format = "ssd.pytorch"')
        config, post, offset = SSD300_COCO, TORCHVISION_POSTPROCESS, 0
        labels = _torchvision_labels(spec, path, fit.num_classes, what)
    else:
        config = SSD300_VOC if size == 300 else SSD512_VOC
        post, offset = BOOK_POSTPROCESS, 1
        what_labels = f"{what} ({fit.num_classes - 1} labels + background)"
        labels = _labels(
            spec,
            path,
            fit.num_classes - 1,
            what_labels,
            None,
            " (background excluded, as the book's VOC_CLASSES)",
        )
    with torch.device("meta"):
        model = SSD(fit.num_classes, config, fit.width)
    _load_into(path, model, sd, what)
    return BuiltModel(
        model,
        "detect",
        fit.arch,
        fmt,
        labels,
        SSDTransform(config.input_size),
        fit.width,
        "",
        config,
        default_boxes(config),
        post,
        offset,
    )


def _torchvision_name(book_key: str) -> str:
    """torchvision's name of a book-layout SSD key."""
    return next(iter(book_to_torchvision({book_key: torch.empty(0)})))


def _torchvision_labels(spec: ModelSpec, path: Path, num_classes: int, what: str) -> list[str]:
    """torchvision counts background as class 0: labels has num_classes entries with the background
    first; a list without it (num_classes - 1) gets "__background__" prepended."""
    if spec.labels is not None and len(spec.labels) == num_classes - 1:
        return ["__background__", *spec.labels]
    return _labels(
        spec,
        path,
        num_classes,
        f"{what} ({num_classes} classes, background at 0)",
        COCO_CATEGORIES,
        f" (background first, or the other {num_classes - 1} alone)",
    )


# --------------------------------------------------------------------------------------------- project format


def _config_to_plain(config: SSDConfig) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "extras":
            value = [list(block) for block in value]
        elif f.name == "aspect_ratios":
            value = [list(r) for r in value]
        elif isinstance(value, tuple):
            value = list(value)
        plain[f.name] = value
    names = [n for n, c in _NAMED_SSD_CONFIGS.items() if c == config]
    plain["name"] = names[0] if names else "custom"
    return plain


def _config_from_plain(plain: Mapping[str, Any]) -> SSDConfig:
    args = {k: v for k, v in plain.items() if k != "name"}
    if "extras" in args:
        args["extras"] = tuple(ExtraBlock(*block) for block in args["extras"])
    if "aspect_ratios" in args:
        args["aspect_ratios"] = tuple(tuple(r) for r in args["aspect_ratios"])
    for k in ("feature_maps", "steps", "min_sizes", "max_sizes", "variances"):
        if k in args:
            args[k] = tuple(args[k])
    return SSDConfig(**args)


def _post_to_plain(config: PostprocessConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def project_checkpoint(
    model: nn.Module,
    *,
    task: Task,
    arch: str,
    labels: Sequence[str],
    preprocess: Mapping[str, Any],
    postprocess: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The project-format dict for ``model`` (a :class:`models.vgg.VGG` or :class:`models.ssd.SSD`).

    ``preprocess``: ``{"kind": "classifier", "resize", "crop"}`` or ``{"kind": "ssd", "size"}``.
    ``postprocess`` (detectors): ``{"semantics": "book" | "torchvision"}``, optionally with
    ``class_offset`` (default 1 for book, 0 for torchvision) and ``config`` (PostprocessConfig
    field overrides). The SSD's default boxes are written from ``model.config``.
    Tensors are copied to the CPU; ``metadata`` must hold plain data only.
    """
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if task == "detect":
        if not isinstance(model, SSD):
            raise ModelConfigError(f"a detect checkpoint needs an SSD model, got {type(model).__name__}")
        semantics = (postprocess or {}).get("semantics", "book")
        if semantics not in _NAMED_POSTPROCESS:
            raise ModelConfigError(f"postprocess semantics must be 'book' or 'torchvision': {semantics!r}")
        base = _NAMED_POSTPROCESS[semantics]
        overrides = dict((postprocess or {}).get("config", {}))
        post_plain = {
            "semantics": semantics,
            "class_offset": int((postprocess or {}).get("class_offset", 1 if semantics == "book" else 0)),
            "config": _post_to_plain(dataclasses.replace(base, **overrides)),
        }
        arch_args: dict[str, Any] = {
            "num_classes": model.num_classes,
            "width": float(model.width),
            "ssd_config": _config_to_plain(model.config),
        }
    else:
        modules = dict(model.named_modules())
        head, stem = modules.get("classifier.6"), modules.get("features.0")
        if not isinstance(head, nn.Linear) or not isinstance(stem, nn.Conv2d):
            raise ModelConfigError(f"a classify checkpoint needs a VGG model, got {type(model).__name__}")
        num_classes, first = head.out_features, stem.out_channels
        arch_args = {"num_classes": num_classes, "width": first / 64}
        post_plain = {}
    return {
        "format": PROJECT_FORMAT,
        "version": PROJECT_VERSION,
        "task": task,
        "arch": arch,
        "arch_args": arch_args,
        "labels": [str(label) for label in labels],
        "preprocess": dict(preprocess),
        "postprocess": post_plain,
        "state_dict": state_dict,
        "metadata": dict(metadata or {}),
    }


def save_project_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    task: Task,
    arch: str,
    labels: Sequence[str],
    preprocess: Mapping[str, Any],
    postprocess: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a project checkpoint (see :func:`project_checkpoint`); returns the path.
    Raises ModelConfigError if ``metadata`` / ``preprocess`` hold anything ``weights_only`` would
    refuse to read back (only str, int, float, bool, None, lists, tuples and str-keyed dicts)."""
    ckpt = project_checkpoint(
        model,
        task=task,
        arch=arch,
        labels=labels,
        preprocess=preprocess,
        postprocess=postprocess,
        metadata=metadata,
    )
    for key in ("preprocess", "postprocess", "metadata", "arch_args"):
        _check_plain(ckpt[key], key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelConfigError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise ModelConfigError(f"{where} is a {type(value).__name__}; a project file holds plain data only")


def _build_project(spec: ModelSpec, path: Path, obj: Mapping[str, Any]) -> BuiltModel:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is a vision-serve project file but {what}; write it again with "
            "models.checkpoints.save_project_checkpoint"
        )

    if obj.get("version") != PROJECT_VERSION:
        raise CheckpointError(
            f"{path} is a vision-serve project file of version {obj.get('version')!r}; this code reads "
            f"version {PROJECT_VERSION}: upgrade the service or convert the file again"
        )
    for key in ("task", "arch", "arch_args", "labels", "preprocess", "state_dict"):
        if key not in obj:
            raise bad(f"has no {key!r} entry")
    arch, args, pre = obj["arch"], obj["arch_args"], obj["preprocess"]
    if arch not in ARCHS:
        raise bad(f"names an unknown arch {arch!r}")
    if arch != spec.arch:
        raise CheckpointError(
            f"{path} is a vision-serve {arch} checkpoint, but the models file says arch = {spec.arch!r}; "
            f"use arch = {arch!r}"
        )
    sd = unwrap_state_dict(obj["state_dict"], path)
    file_labels = [str(x) for x in obj["labels"]]
    if spec.labels is not None and len(spec.labels) != len(file_labels):
        raise ModelConfigError(
            f"model {spec.name!r}: {path} carries {len(file_labels)} labels, but the models file gives "
            f"{len(spec.labels)}; remove labels from the models file to use the file's own"
        )
    labels = list(spec.labels) if spec.labels is not None else file_labels
    metadata = dict(obj.get("metadata") or {})
    try:
        num_classes, width = int(args["num_classes"]), float(args["width"])
        if arch.startswith("vgg"):
            transform: ClassifierTransform | SSDTransform = ClassifierTransform(
                spec.resize or int(pre["resize"]), spec.crop or int(pre["crop"])
            )
            kind_ok = pre.get("kind") == "classifier"
        else:
            config = _config_from_plain(args["ssd_config"])
            post = obj.get("postprocess") or {}
            semantics = post.get("semantics")
            if semantics not in _NAMED_POSTPROCESS:
                raise bad(f"its postprocess semantics is {semantics!r}, not 'book' or 'torchvision'")
            post_config = dataclasses.replace(_NAMED_POSTPROCESS[semantics], **post.get("config", {}))
            offset = int(post.get("class_offset", 1 if semantics == "book" else 0))
            transform = SSDTransform(int(pre.get("size", config.input_size)))
            kind_ok = pre.get("kind") == "ssd" and transform.size == config.input_size
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"{type(e).__name__}: {e}"
        raise bad(f"its arch_args, preprocess or postprocess cannot be read ({detail})") from None
    if not kind_ok:
        raise bad(f"its preprocess {dict(pre)!r} does not suit a {arch}")
    what = f"a {num_classes}-class {arch} (vision-serve project file)"

    if arch.startswith("vgg"):
        if len(labels) != num_classes:
            raise bad(f"it has {len(labels)} labels for {num_classes} classes")
        with torch.device("meta"):
            model = VGG_BUILDERS[arch](num_classes=num_classes, width=width)
        _load_into(path, model, sd, what)
        return BuiltModel(model, "classify", arch, "project", labels, transform, width, "", metadata=metadata)

    if len(labels) != num_classes - offset:
        raise bad(f"it has {len(labels)} labels for {num_classes} classes with class_offset {offset}")
    if f"ssd{config.input_size}" != arch:
        raise bad(f"its arch {arch!r} disagrees with its default boxes (input size {config.input_size})")
    priors = default_boxes(config)
    with torch.device("meta"):
        ssd = SSD(num_classes, config, width)
        size = config.input_size
        anchors = ssd(torch.empty(1, 3, size, size))[0].shape[1]  # shapes only, on the meta device
    if anchors != priors.shape[0]:
        raise bad(f"its default boxes ({priors.shape[0]}) do not match the network's {anchors} outputs")
    _load_into(path, ssd, sd, what)
    return BuiltModel(
        ssd,
        "detect",
        arch,
        "project",
        labels,
        transform,
        width,
        "",
        config,
        priors,
        post_config,
        offset,
        metadata=metadata,
    )
