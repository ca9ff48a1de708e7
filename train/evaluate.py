"""``python -m train evaluate``: score a checkpoint on a held-out split as the service answers.

The file is loaded with ``models.load_model`` and every image goes through the predictor's own
``preprocess`` and ``predict``, so the score is the served model's. Detectors are scored by a
``train.metrics`` metric (VOC07 by default), classifiers by top-1, top-5, per-class accuracy and
the confusion matrix; a precision other than fp32 also reports the agreement with fp32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models import Classifier, Detector, ModelSpec, agreement_report, load_calibration_images, load_model
from models.checkpoints import read_checkpoint
from models.quantize import quantize_predictor
from train.common import progress
from train.errors import TrainError
from train.metrics import (
    COCO_TOOL,
    DETECTION_PARAMS,
    METRIC_TITLES,
    ClassificationResults,
    DetectionResults,
    Metric,
)
from train.options import EVALUATE_PRECISIONS
from train.voc import read_split, read_voc

__all__ = ["describe", "evaluate_checkpoint", "write_confusion_png", "write_report"]


def evaluate_checkpoint(
    weights: Path,
    data: Path,
    split: str = "val",
    batch_size: int = 16,
    show: bool = True,
    precision: str = "fp32",
    calibration: Path | None = None,
    metric: Metric | None = None,
) -> dict[str, Any]:
    """Score the project checkpoint ``weights`` on ``data``'s ``split``; returns the JSON report.

    Classifiers: ``data/<split>/<class>/*`` (folders matched to the checkpoint's labels by name).
    Detectors: the VOC split ``data/ImageSets/Main/<split>.txt``, by ``metric`` (default voc07),
    on the detections of ``train.metrics.DETECTION_PARAMS``. ``precision`` bf16, or int8
    calibrated on the images in ``calibration`` (as the service's VISION_PRECISION=int8), adds
    ``agreement``: the same images through an fp32 copy, compared by ``models.agreement_report``.
    """
    if precision not in EVALUATE_PRECISIONS:
        raise TrainError(
            f"precision must be one of {', '.join(EVALUATE_PRECISIONS)} on the CPU, not {precision!r}"
        )
    if precision == "int8" and calibration is None:
        raise TrainError("--precision int8 needs --calibration DIR (images of the model's own kind)")
    if not data.is_dir():
        raise TrainError(f"--data {data} is not a folder")
    obj, _ = read_checkpoint(weights)
    if not (isinstance(obj, dict) and obj.get("format") == "vision-serve"):
        raise TrainError(f"{weights} is not a project checkpoint (python -m train writes those)")
    spec = ModelSpec(name="evaluate", task=obj["task"], arch=obj["arch"], format="project", weights=weights)
    predictor = load_model(spec, "cpu", precision="bf16" if precision == "bf16" else "fp32")
    if precision == "int8":
        assert calibration is not None
        quantize_predictor(predictor, load_calibration_images(calibration))
    reference = load_model(spec, "cpu") if precision != "fp32" else None  # fp32, for the agreement
    extra: dict[str, Any] = {"precision": precision}
    if calibration is not None and precision == "int8":
        extra["calibration"] = str(calibration)
    if isinstance(predictor, Classifier):
        if metric is not None:
            raise TrainError(
                f"--metric {metric} scores detectors; a classifier reports top-1 and top-5 accuracy"
            )
        assert reference is None or isinstance(reference, Classifier)
        return {
            "task": "classify",
            **_classifier_scores(predictor, reference, data, split, batch_size, show),
            **extra,
        }
    assert isinstance(predictor, Detector) and (reference is None or isinstance(reference, Detector))
    scores = _detector_scores(predictor, reference, data, split, batch_size, show, metric or "voc07")
    return {"task": "detect", **scores, **extra}


def _batches(
    predictor: Classifier | Detector, paths: Sequence[Path], batch_size: int, show: bool, desc: str
) -> Iterator[tuple[int, Tensor, list[tuple[int, int]]]]:
    """(position of the first image, preprocessed batch, (width, height) of each original image)."""
    for start in progress(range(0, len(paths), batch_size), show, desc):
        images, sizes = [], []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")
            except OSError as e:
                raise TrainError(f"{path}: not an image PIL can read ({e})") from None
            images.append(predictor.preprocess(image))
            sizes.append(image.size)
        yield start, torch.stack(images), sizes


def _classifier_scores(
    predictor: Classifier, reference: Classifier | None, data: Path, split: str, batch_size: int, show: bool
) -> dict[str, Any]:
    from torchvision.datasets import ImageFolder

    labels = predictor.info.labels
    try:
        folder = ImageFolder(str(data / split))
    except FileNotFoundError as e:
        raise TrainError(f"{data / split}: expected class folders of images ({e})") from None
    unknown = [c for c in folder.classes if c not in labels]
    if unknown:
        raise TrainError(f"{data / split} has classes {unknown} that the checkpoint does not know ({labels})")
    results = ClassificationResults(labels)
    logits: dict[str, list[Tensor]] = {"reference": [], "candidate": []}
    paths = [Path(path) for path, _ in folder.samples]
    for start, batch, _ in _batches(predictor, paths, batch_size, show, f"{split} top-1"):
        outputs = predictor.predict(batch, top_k=5)
        for (_, index), output in zip(folder.samples[start:], outputs, strict=False):
            results.add(output, labels.index(folder.classes[index]))
        if reference is not None:
            logits["candidate"].append(_logits(predictor, batch))
            logits["reference"].append(_logits(reference, batch))
    scores = results.as_json(folder.classes)
    if reference is not None:
        scores["agreement"] = agreement_report(torch.cat(logits["reference"]), torch.cat(logits["candidate"]))
    return scores


def _detector_scores(
    predictor: Detector,
    reference: Detector | None,
    data: Path,
    split: str,
    batch_size: int,
    show: bool,
    metric: Metric,
) -> dict[str, Any]:
    labels = predictor.info.labels
    ids = read_split(data, split)
    truths = [read_voc(data / "Annotations" / f"{image_id}.xml", labels) for image_id in ids]
    paths = [data / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
    results = DetectionResults(labels)
    found_all: dict[str, list[Any]] = {"reference": [], "candidate": []}
    for start, batch, sizes in _batches(predictor, paths, batch_size, show, f"{split} {metric}"):
        params = [DETECTION_PARAMS] * len(sizes)
        found = predictor.predict(batch, sizes, params)
        for k, output in enumerate(found):
            results.add(output, truths[start + k])
        if reference is not None:
            found_all["candidate"].extend(found)
            found_all["reference"].extend(reference.predict(batch, sizes, params))
    scores = results.score(metric).as_json()
    if reference is not None:
        scores["agreement"] = agreement_report(found_all["reference"], found_all["candidate"])
    return scores


def _logits(predictor: Classifier, batch: Tensor) -> Tensor:
    """The classifier network's raw outputs for a preprocessed batch, as float32 on the CPU."""
    with torch.inference_mode():
        x = batch.to(predictor.device, predictor.dtype).contiguous(memory_format=torch.channels_last)
        out: Tensor = predictor.model(x)
    return out.float().cpu()


def describe(result: Mapping[str, Any]) -> list[str]:
    """Lines for a person: every number with the name of its metric."""
    if result["task"] == "classify":
        lines = [
            f"top-1 accuracy = {result['top1']:.4f}, top-5 accuracy = {result['top5']:.4f} "
            f"on {result['images']} images"
        ]
        lines += [f"  top-1 accuracy {label} = {value:.4f}" for label, value in result["per_class"].items()]
    else:
        metric: Metric = result["metric"]
        title = METRIC_TITLES[metric]
        lines = [
            f"{title} = {result['map']:.4f} on {result['images']} images, {result['objects']} objects "
            f"({result['difficult']} difficult, ignored)"
        ]
        if metric == "coco":
            lines[0] += f"; by {COCO_TOOL}"
            lines.append(
                f"COCO AP50 = {result['ap50']:.4f}, AP75 = {result['ap75']:.4f}, "
                f"AR@100 = {result['ar100']:.4f}"
            )
        each = title.replace("mAP", "AP")
        for label, ap in result["per_class"].items():
            lines.append(f"  {each} {label} = " + ("n/a (no object)" if ap is None else f"{ap:.4f}"))
    if "agreement" in result:
        lines.append(f"agreement of {result['precision']} with fp32: {json.dumps(result['agreement'])}")
    return lines


def write_report(result: Mapping[str, Any], path: Path) -> list[Path]:
    """``path`` as JSON, and for a classifier ``<stem>-confusion.png`` next to it when matplotlib is
    installed; returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    written = [path]
    if result["task"] == "classify":
        png = path.with_name(f"{path.stem}-confusion.png")
        if write_confusion_png(png, result["confusion"]["labels"], result["confusion"]["matrix"]):
            written.append(png)
    return written


def write_confusion_png(path: Path, labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> bool:
    """The confusion matrix as a picture (rows: true label, columns: predicted); False, writing
    nothing, when matplotlib is not installed (it is in the bench extra, not the train extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    counts = np.asarray(matrix)
    n = len(labels)
    side = min(2.0 + 0.5 * n, 20.0)
    figure = Figure(figsize=(side, side))
    axes = figure.add_subplot()
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(n), labels, rotation=45, ha="right")
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if n <= 30:
        for (row, col), count in np.ndenumerate(counts):
            dark = count > counts.max() / 2
            axes.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True
