"""Correctness on the device (issue 16): the same images give the same answers on a GPU as on the CPU.

Three checkpoints in the real layouts, with seeded random weights (``tests/checkpoint_factory.py``):

- ``book_vgg16``: the book's fine-tuned 2-class VGG16 (``state_dict`` format, saved from ``cuda:0``);
- ``torchvision_vgg16``: torchvision's 1000-class ImageNet VGG16 (``torchvision`` format, CPU file);
- ``book_ssd300``: the book's / ssd.pytorch's SSD300 with 21 VOC classes (``ssd.pytorch`` format,
  saved from ``cuda:0``), ``confident``: a few confident boxes per image, as a trained SSD gives.

Each is loaded with :func:`models.load_model` on the CPU in fp32 (the reference), on the device in
fp32, and on the device in each lower precision; :func:`models.reference_outputs` runs all of them on
the same images (photos that ship with scikit-learn cut to varied sizes, 500x375 first, plus some
synthetic ones), and :func:`models.agreement_report` compares them.

1. Device fp32 against CPU fp32 decides the exit code. A classifier passes when every image has the
   same top-1 class and no softmax probability moves by more than 2e-3; a detector passes when every
   reference detection with score >= 0.5 is found again (same class, IoU >= 0.5), no other detection
   reaches 0.5, no score moves by more than 2e-3 and no box coordinate by more than 0.5 px. A detector
   without a single reference detection >= 0.5 fails: the check would have compared nothing.
2. Each lower precision (fp16, bf16) against device fp32 is reported (top-1 agreement, score
   differences, recall and the recall at IoU >= 0.9) and marked ``ok`` at top-1 agreement >= 0.9
   (classifier) or recall at IoU >= 0.9 of at least 0.9 (detector); it does not change the exit code.
   A precision the device cannot run (bf16 before compute capability 8.0) is recorded as skipped.

Run it on the GPU machine (``--device cpu`` runs the same code on the CPU, for testing)::

    python -m bench.device_check --device cuda --precisions fp16,bf16 --images 12 --json device-check.json

It prints a markdown table and writes a JSON document (``--json``, schema
``vision-serve-device-check/1``). Exit code 0 when every fp32 check passes, 1 when one fails (or a
model could not be loaded or run: recorded in its entry), 2 on a setup error (no CUDA, bad arguments).
Full size (``--width 1``) writes 1.2 GB of checkpoints into ``--work-dir`` (a temporary folder by
default, removed at the end) and loads one model at a time: 1.5 GB of host memory at most on the CPU,
where 4 images with bf16 take about a minute on two cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from bench.inputs import fit, source_photos, synthetic_photo
from models import (
    VOC_CLASSES,
    DetectOutput,
    ModelConfigError,
    ModelSpec,
    Precision,
    Task,
    agreement_report,
    load_model,
    reference_outputs,
    resolve_device,
)
from tests.checkpoint_factory import write_book_ssd, write_book_vgg16, write_torchvision_vgg16

__all__ = [
    "BOX_TOLERANCE_PX",
    "CHECK_MODELS",
    "SCHEMA",
    "SCORE_TOLERANCE",
    "CheckModel",
    "build_parser",
    "check_images",
    "check_model",
    "judge_fp32",
    "main",
    "markdown_table",
    "precision_ok",
    "unsupported_reason",
]

SCHEMA = "vision-serve-device-check/1"
#: device fp32 against CPU fp32: the largest |score difference| (softmax probability or detection score)
SCORE_TOLERANCE = 2e-3
#: device fp32 against CPU fp32: the largest |box coordinate difference| in pixels of the original image
BOX_TOLERANCE_PX = 0.5
#: detections at or above this score are the ones compared
SCORE_THRESHOLD = 0.5
#: a lower precision is ``ok`` at this top-1 agreement (classifier) / recall at IoU >= 0.9 (detector)
AGREEMENT_OK = 0.9
#: the lower precisions this check knows (fp32 is always run)
LOW_PRECISIONS: dict[str, Precision] = {"fp16": "fp16", "bf16": "bf16"}
#: (width, height) of the check images in order, repeated when more are asked for: a PASCAL VOC
#: photo first, then portrait, square, small, odd and large ones
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (500, 375),
    (375, 500),
    (640, 480),
    (300, 300),
    (1024, 683),
    (333, 517),
    (800, 600),
    (224, 224),
    (1280, 720),
    (480, 640),
    (150, 200),
    (1920, 1080),
)
#: the labels of the book's 2-class VGG16 (chapter 1: ants and bees)
BOOK_VGG_LABELS: tuple[str, ...] = ("ants", "bees")


@dataclass(frozen=True)
class CheckModel:
    """One checked model: how the models file would describe it and how to write its checkpoint."""

    name: str
    task: Task
    arch: str
    format: str
    labels: tuple[str, ...] | None
    #: (path, width) -> the written path
    write: Callable[[Path, float], Path]

    def spec(self, weights: Path) -> ModelSpec:
        return ModelSpec(
            name=self.name,
            task=self.task,
            arch=self.arch,
            format=self.format,
            weights=weights,
            labels=self.labels,
        )


def _write_book_vgg16(path: Path, width: float) -> Path:
    return write_book_vgg16(path, num_classes=len(BOOK_VGG_LABELS), width=width, seed=0, gpu=True)


def _write_torchvision_vgg16(path: Path, width: float) -> Path:
    return write_torchvision_vgg16(path, width=width, seed=1)  # torchvision's file holds CPU tensors


def _write_book_ssd(path: Path, width: float) -> Path:
    return write_book_ssd(
        path, num_classes=len(VOC_CLASSES) + 1, width=width, confident=True, gpu=True, seed=2
    )


CHECK_MODELS: tuple[CheckModel, ...] = (
    CheckModel("book_vgg16", "classify", "vgg16", "state_dict", BOOK_VGG_LABELS, _write_book_vgg16),
    CheckModel("torchvision_vgg16", "classify", "vgg16", "torchvision", None, _write_torchvision_vgg16),
    CheckModel("book_ssd300", "detect", "ssd300", "ssd.pytorch", tuple(VOC_CLASSES), _write_book_ssd),
)


# --------------------------------------------------------------------------- judging (pure)


def _within(value: Any, bound: float) -> bool:
    """``value`` is a number <= ``bound`` (None and NaN are not)."""
    return isinstance(value, int | float) and value <= bound


def judge_fp32(report: dict[str, Any], task: Task) -> list[str]:
    """Why the device's fp32 answers differ from the CPU's, from ``agreement_report(cpu, device)``:
    an empty list when they agree within the tolerances (see the module's docstring)."""
    failures: list[str] = []
    if task == "classify":
        agreement = report.get("top1_agreement")
        if agreement != 1.0:
            images = report.get("images", 0)
            differ = round((1.0 - agreement) * images) if isinstance(agreement, int | float) else "?"
            failures.append(f"top-1 class differs on {differ} of {images} images (agreement {agreement})")
        score = report.get("score_diff_max")
        if not _within(score, SCORE_TOLERANCE):
            failures.append(f"probability differs by {score} > {SCORE_TOLERANCE}")
        return failures
    reference = report.get("reference_detections", 0)
    extra = report.get("extra_detections", 0)
    if extra:
        failures.append(f"{extra} extra detection(s) at score >= {SCORE_THRESHOLD}")
    if not reference:
        failures.append(
            f"no reference detection at score >= {SCORE_THRESHOLD} on any image: nothing was compared"
        )
        return failures
    matched = report.get("matched", 0)
    if matched != reference:
        failures.append(
            f"{reference - matched} of {reference} reference detection(s) not found (same class, IoU >= 0.5)"
        )
    score = report.get("score_diff_max")
    if not _within(score, SCORE_TOLERANCE):
        failures.append(f"score differs by {score} > {SCORE_TOLERANCE}")
    box = report.get("box_diff_max_px")
    if not _within(box, BOX_TOLERANCE_PX):
        failures.append(f"box differs by {box} px > {BOX_TOLERANCE_PX} px")
    return failures


def precision_ok(report: dict[str, Any], task: Task) -> bool:
    """A lower precision answers like fp32 closely enough to be served: top-1 agreement (classifier)
    or recall at IoU >= 0.9 (detector) of at least :data:`AGREEMENT_OK`."""
    key = "top1_agreement" if task == "classify" else "high_iou_recall"
    value = report.get(key)
    return isinstance(value, int | float) and value >= AGREEMENT_OK


def unsupported_reason(device: torch.device, precision: str) -> str | None:
    """Why ``device`` cannot run ``precision``, or None. bf16 needs compute capability 8.0 (Ampere);
    fp16 runs on every CUDA GPU, and on the CPU both run (slowly where the CPU lacks the instructions)."""
    if device.type == "cuda" and precision == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            name = torch.cuda.get_device_name(device)
            return f"{name} (compute capability {major}.{minor}) has no bf16; it needs 8.0 or later"
    return None


# --------------------------------------------------------------------------- running


def check_images(count: int) -> tuple[list[Image.Image], str]:
    """``count`` RGB images of the sizes in :data:`IMAGE_SIZES` (in order, repeated): the packaged
    photos cut to each size, every fourth a synthetic one; and where the photos came from."""
    photos, source = source_photos()
    images: list[Image.Image] = []
    for i in range(count):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        if i % 4 == 3:
            images.append(synthetic_photo(width, height, seed=i))
        else:
            images.append(fit(photos[i % len(photos)][1], width, height))
    return images, source if count < 4 else f"{source}+synthetic"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _outputs(
    spec: ModelSpec,
    device: torch.device,
    precision: Precision,
    images: Sequence[Image.Image],
    batch_size: int,
) -> Tensor | list[DetectOutput]:
    """Load ``spec`` on ``device`` in ``precision``, run it on ``images``, free it again."""
    predictor = load_model(spec, device, precision)
    try:
        return reference_outputs(predictor, images, batch_size)
    finally:
        del predictor
        _free(device)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def check_model(
    model: CheckModel,
    weights: Path,
    device: torch.device,
    precisions: Sequence[Precision],
    images: Sequence[Image.Image],
    batch_size: int,
) -> dict[str, Any]:
    """One model's entry of the JSON document: ``fp32_vs_cpu`` and ``<precision>_vs_fp32``.

    A model that cannot be loaded or run gets ``error`` and a failed ``fp32_vs_cpu``; a precision
    that cannot, ``error`` (or ``skipped`` when the device has no such precision) and ``ok`` false
    (None when skipped)."""
    entry: dict[str, Any] = {"task": model.task, "arch": model.arch, "format": model.format}
    spec = model.spec(weights)
    started = time.perf_counter()
    cpu = torch.device("cpu")
    try:
        reference = _outputs(spec, cpu, "fp32", images, batch_size)
        device_fp32 = _outputs(spec, device, "fp32", images, batch_size)
        report = agreement_report(reference, device_fp32, score_threshold=SCORE_THRESHOLD)
    except Exception as exc:  # recorded: the other models are still checked
        entry["error"] = _error(exc)
        entry["fp32_vs_cpu"] = {"pass": False, "failures": [f"could not load or run: {_error(exc)}"]}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        return entry
    failures = judge_fp32(report, model.task)
    entry["fp32_vs_cpu"] = {**report, "pass": not failures, "failures": failures}
    for precision in precisions:
        key = f"{precision}_vs_fp32"
        reason = unsupported_reason(device, precision)
        if reason is not None:
            entry[key] = {"skipped": reason, "ok": None}
            continue
        try:
            low = _outputs(spec, device, precision, images, batch_size)
            report = agreement_report(device_fp32, low, score_threshold=SCORE_THRESHOLD)
        except Exception as exc:  # recorded: the other precisions and models still run
            entry[key] = {"error": _error(exc), "ok": False}
            continue
        entry[key] = {**report, "ok": precision_ok(report, model.task)}
    entry["seconds"] = round(time.perf_counter() - started, 2)
    return entry


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities written as strings, so that the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------- output


def _number(value: Any, digits: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return format(value, digits)
    return str(value)


def markdown_table(document: dict[str, Any]) -> str:
    """The document as a markdown table: one row per model and comparison."""
    lines = [
        f"Device check on {document['device']} (torch {document['torch']}, CUDA {document['cuda']}), "
        f"width {document['width']:g}, {document['images']} images: "
        f"{'PASS' if document['pass'] else 'FAIL'}",
        "",
        "| model | check | verdict | top-1 / recall | recall IoU>=0.9 | max score diff | max box diff px "
        "| ref dets >= 0.5 | extra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in document["models"].items():
        for key, result in entry.items():
            if not key.endswith(("_vs_cpu", "_vs_fp32")):
                continue
            if "pass" in result:
                verdict = "pass" if result["pass"] else "FAIL: " + "; ".join(result["failures"])
            elif "skipped" in result:
                verdict = f"skipped: {result['skipped']}"
            elif "error" in result:
                verdict = f"error: {result['error']}"
            else:
                verdict = "ok" if result["ok"] else "not ok"
            cells = [
                name,
                key,
                verdict,
                _number(result.get("top1_agreement", result.get("recall")), ".3f"),
                _number(result.get("high_iou_recall"), ".3f"),
                _number(result.get("score_diff_max")),
                _number(result.get("box_diff_max_px")),
                _number(result.get("reference_detections"), "d"),
                _number(result.get("extra_detections"), "d"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _precisions(text: str) -> list[Precision]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOW_PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown precision(s) {', '.join(unknown)}; use {', '.join(LOW_PRECISIONS)} (fp32 always runs)"
        )
    return [LOW_PRECISIONS[name] for name in dict.fromkeys(names)]


def _models(text: str) -> list[CheckModel]:
    known = {model.name: model for model in CHECK_MODELS}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"models: a comma-separated subset of {', '.join(known)}")
    return [known[name] for name in dict.fromkeys(names)]


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.device_check",
        description="device fp32 against CPU fp32, and fp16 / bf16 against device fp32 (issue 16)",
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument(
        "--precisions",
        type=_precisions,
        default=_precisions("fp16,bf16"),
        help="lower precisions to compare with device fp32, comma-separated, empty for none "
        "(default fp16,bf16)",
    )
    parser.add_argument(
        "--width", type=_positive(float), default=1.0, help="channel scale; 1 is the real size (default)"
    )
    parser.add_argument("--images", type=_positive(int), default=12, help="how many images (default 12)")
    parser.add_argument("--batch-size", type=_positive(int), default=4, help="images per forward (default 4)")
    parser.add_argument(
        "--models",
        type=_models,
        default=list(CHECK_MODELS),
        help=f"comma-separated subset of {', '.join(m.name for m in CHECK_MODELS)} (default all)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where the checkpoints are written (default a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="write the JSON document here")
    return parser


def run_checks(args: argparse.Namespace, device: torch.device, work_dir: Path) -> dict[str, Any]:
    """Every model's checks; the JSON document."""
    images, source = check_images(args.images)
    models: dict[str, Any] = {}
    for model in args.models:
        weights = work_dir / f"{model.name}_w{args.width:g}.pth"
        try:
            model.write(weights, args.width)
        except Exception as exc:  # recorded like a model that does not load
            models[model.name] = {
                "task": model.task,
                "arch": model.arch,
                "format": model.format,
                "error": _error(exc),
                "fp32_vs_cpu": {
                    "pass": False,
                    "failures": [f"could not write the checkpoint: {_error(exc)}"],
                },
            }
            continue
        models[model.name] = check_model(model, weights, device, args.precisions, images, args.batch_size)
        _free(device)
    return {
        "schema": SCHEMA,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # torch.backends.cudnn's functions have no annotations; version() is None without cuDNN
        "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        # load_model switches cuDNN's TF32 off for fp32 on CUDA; matmuls use TF32 only when asked to
        "tf32": {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "width": args.width,
        "images": len(images),
        "image_sizes": [list(image.size) for image in images],
        "image_source": source,
        "batch_size": args.batch_size,
        "score_threshold": SCORE_THRESHOLD,
        "tolerances": {"score": SCORE_TOLERANCE, "box_px": BOX_TOLERANCE_PX},
        "models": models,
        "pass": all(entry["fp32_vs_cpu"]["pass"] for entry in models.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ModelConfigError as exc:
        print(f"device_check: {exc}", file=sys.stderr)
        return 2
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
            document = run_checks(args, device, Path(tmp))
    else:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        document = run_checks(args, device, args.work_dir)
    document = _finite(document)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown_table(document))
    return 0 if document["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
