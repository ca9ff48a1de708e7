"""Detection and classification scores, each named by the metric that computed it.

- ``voc07`` / ``voc12``: PASCAL VOC AP at IoU > 0.5 by the devkit's rules (as py-faster-rcnn's
  ``voc_eval.py`` ports them): ground truth as the file gives it, detections written 1-based
  (``x + 1``), +1 pixel widths, heights and areas; per class, detections sorted by score over the
  whole set, each ground truth matched once; a match to a ``difficult`` object counts neither way
  and difficult objects are not in the recall denominator. ``voc07`` reads 11 recall levels,
  ``voc12`` takes the area under the precision envelope; mAP is over the classes with objects.
- ``coco``: AP@[.5:.95], AP50, AP75, AR@100 from faster-coco-eval, the COCO tool itself (not
  torchmetrics, whose float32 thresholds drift from it); difficult objects as COCO's crowd regions.

All score the detections of :data:`DETECTION_PARAMS`, ssd.pytorch's evaluation protocol.
Classification: top-1, top-5, per-class accuracy and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from models import ClassifyOutput, DetectOutput, DetectParams
from train.options import METRIC_TITLES, METRICS, Metric
from train.voc import VOC_PIXEL_ORIGIN, VOCTruth

__all__ = [
    "COCO_TOOL",
    "DETECTION_PARAMS",
    "METRICS",
    "METRIC_TITLES",
    "VOC_IOU",
    "ClassificationResults",
    "DetectionResults",
    "DetectionScore",
    "Metric",
    "coco_score",
    "devkit_iou",
    "voc_ap",
    "voc_score",
]

#: ssd.pytorch's evaluation protocol: every detection scoring >= 0.01 after the model's own NMS,
#: at most 200 per image.
DETECTION_PARAMS = DetectParams(score_threshold=0.01, iou_threshold=None, max_detections=200)

#: A detection matches a ground truth when their IoU is strictly greater than this (the devkit's).
VOC_IOU = 0.5

#: The 11 recall levels of VOC2007's AP, as the devkit's Python ports build them (so 0.3, 0.6 and
#: 0.7 are the float just above; a recall of exactly 0.3 does not reach the 0.3 level).
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


@dataclass(frozen=True)
class DetectionScore:
    """A detection metric over a split. ``per_class`` maps each label to its AP (None for a class
    with no non-difficult object, which the mean leaves out); ``objects`` counts every object of the
    split, ``difficult`` those of them marked difficult; ``extra`` holds COCO's other numbers."""

    metric: Metric
    map: float
    per_class: dict[str, float | None]
    images: int
    objects: int
    difficult: int
    extra: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "map": self.map,
            "per_class": self.per_class,
            "images": self.images,
            "objects": self.objects,
            "difficult": self.difficult,
            **self.extra,
        }


class DetectionResults:
    """A split's detections and ground truths, image by image; :meth:`score` computes a metric.

    ``found``: the model's ``DetectOutput`` (boxes in 0-based pixels of the original image, class
    ids positions in ``labels``); ``truth``: the image's annotation as the file gives it.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.found: list[DetectOutput] = []
        self.truths: list[VOCTruth] = []

    def add(self, found: DetectOutput, truth: VOCTruth) -> None:
        self.found.append(found)
        self.truths.append(truth)

    def score(self, metric: Metric) -> DetectionScore:
        if metric == "coco":
            return coco_score(self.found, self.truths, self.labels)
        return voc_score(self.found, self.truths, self.labels, metric)


def devkit_iou(boxes: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """IoU of each of ``boxes`` (float[D, 4]) with each of ``truths`` (float[G, 4]) -> float[D, G], all
    [x1, y1, x2, y2] in 1-based pixel indices with the max inclusive: a box spans x2 - x1 + 1 pixels."""
    a, b = boxes[:, None, :], truths[None, :, :]
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
    area_b = (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
    iou: np.ndarray = inter / (area_a + area_b - inter)
    return iou


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: Literal["voc07", "voc12"]) -> float:
    """AP from the cumulative recall and precision of a class's score-sorted detections."""
    if metric == "voc07":
        return float(sum(precision[recall >= t].max(initial=0.0) for t in VOC07_RECALLS) / 11)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at any higher recall
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_score(
    found: Sequence[DetectOutput],
    truths: Sequence[VOCTruth],
    labels: Sequence[str],
    metric: Literal["voc07", "voc12"],
) -> DetectionScore:
    """VOC AP per class and their mean (the rules are in the module docstring)."""
    # every detection's best ground truth of its own class in its image (-inf overlap: none there)
    columns: dict[str, list[np.ndarray]] = {"class": [], "score": [], "image": [], "best": [], "overlap": []}
    for image, (out, truth) in enumerate(zip(found, truths, strict=True)):
        classes = out.class_ids.numpy()
        ious = devkit_iou(out.boxes.double().numpy() + VOC_PIXEL_ORIGIN, truth.boxes)
        ious[classes[:, None] != truth.labels[None, :]] = -np.inf
        columns["class"].append(classes)
        columns["score"].append(out.scores.double().numpy())
        columns["image"].append(np.full(len(classes), image))
        columns["best"].append(ious.argmax(axis=1) if truth.boxes.size else np.zeros(len(classes), dtype=int))
        columns["overlap"].append(ious.max(axis=1, initial=-np.inf))
    det = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in columns.items()}
    per_class: dict[str, float | None] = {}
    for cls, label in enumerate(labels):
        positives = sum(int(np.sum((t.labels == cls) & ~t.difficult)) for t in truths)
        if positives == 0:
            per_class[label] = None
            continue
        mine = np.flatnonzero(det["class"] == cls)
        mine = mine[np.argsort(-det["score"][mine], kind="stable")]  # by score over the whole set
        tp, fp = np.zeros(len(mine)), np.zeros(len(mine))
        matched: set[tuple[int, int]] = set()
        for k, (image, best, overlap) in enumerate(
            zip(
                det["image"][mine].tolist(),
                det["best"][mine].tolist(),
                det["overlap"][mine].tolist(),
                strict=True,
            )
        ):
            if overlap <= VOC_IOU:
                fp[k] = 1
            elif truths[image].difficult[best]:
                continue  # neither a true nor a false positive
            elif (image, best) in matched:
                fp[k] = 1
            else:
                tp[k] = 1
                matched.add((image, best))
        tp_sum, fp_sum = np.cumsum(tp), np.cumsum(fp)
        precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
        per_class[label] = voc_ap(tp_sum / positives, precision, metric)
    counted = [ap for ap in per_class.values() if ap is not None]
    return _scored(metric, float(np.mean(counted)) if counted else -1.0, per_class, truths)


def _scored(
    metric: Metric,
    mean: float,
    per_class: dict[str, float | None],
    truths: Sequence[VOCTruth],
    extra: dict[str, float] | None = None,
) -> DetectionScore:
    return DetectionScore(
        metric=metric,
        map=mean,
        per_class=per_class,
        images=len(truths),
        objects=sum(len(t.labels) for t in truths),
        difficult=sum(int(t.difficult.sum()) for t in truths),
        extra=extra or {},
    )


#: What reports call the COCO evaluation.
COCO_TOOL = "faster-coco-eval COCOeval_faster"


def coco_score(
    found: Sequence[DetectOutput], truths: Sequence[VOCTruth], labels: Sequence[str]
) -> DetectionScore:
    """COCO's numbers by faster-coco-eval itself (see the module docstring); ``per_class`` is each
    class's AP@[.5:.95] (None for a class without objects)."""
    from faster_coco_eval import COCO, COCOeval_faster  # the train extra; only when asked for

    images: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for image, (out, truth) in enumerate(zip(found, truths, strict=True)):
        images.append({"id": image, "width": truth.width, "height": truth.height})
        for box, label, hard in zip(
            (truth.boxes - VOC_PIXEL_ORIGIN).tolist(),
            truth.labels.tolist(),
            truth.difficult.tolist(),
            strict=True,
        ):
            width, height = box[2] - box[0], box[3] - box[1]
            objects.append(
                {
                    "id": len(objects) + 1,
                    "image_id": image,
                    "category_id": label,
                    "iscrowd": int(hard),
                    "bbox": [box[0], box[1], width, height],
                    "area": width * height,
                }
            )
        for box, score, label in zip(
            out.boxes.tolist(), out.scores.tolist(), out.class_ids.tolist(), strict=True
        ):
            detections.append(
                {
                    "image_id": image,
                    "category_id": label,
                    "score": score,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    categories = [{"id": k, "name": name} for k, name in enumerate(labels)]
    reference = COCO({"images": images, "annotations": objects, "categories": categories})
    evaluation = COCOeval_faster(reference, reference.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = [float(v) for v in evaluation.stats]
    precision = evaluation.eval["precision"]  # (IoU, recall level, class, area range, max detections)
    per_class: dict[str, float | None] = {}
    for k, label in enumerate(labels):
        values = precision[:, :, k, 0, -1]  # every area, the most detections (100)
        per_class[label] = float(values[values > -1].mean()) if (values > -1).any() else None
    return _scored(
        "coco", stats[0], per_class, truths, {"ap50": stats[1], "ap75": stats[2], "ar100": stats[8]}
    )


class ClassificationResults:
    """Top-k predictions against true labels, image by image: top-1, top-5, per-class accuracy and
    the confusion matrix (rows: true label, columns: predicted label, both in ``labels`` order)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
        self.top5_hits = 0

    def add(self, output: ClassifyOutput, true_label: int) -> None:
        """``output`` holds at least min(5, classes) class ids, best first."""
        ids = output.class_ids.tolist()
        self.confusion[true_label, ids[0]] += 1
        self.top5_hits += true_label in ids[:5]

    def as_json(self, classes: Sequence[str]) -> dict[str, Any]:
        """The scores over ``classes`` (the labels the split has images of)."""
        total = int(self.confusion.sum())
        hits = np.diag(self.confusion)
        rows = self.confusion.sum(axis=1)
        positions = [self.labels.index(c) for c in classes]
        return {
            "metric": "accuracy",
            "images": total,
            "top1": int(hits.sum()) / max(total, 1),
            "top5": self.top5_hits / max(total, 1),
            "per_class": {
                c: int(hits[k]) / max(int(rows[k]), 1) for c, k in zip(classes, positions, strict=True)
            },
            "confusion": {"labels": self.labels, "matrix": self.confusion.tolist()},
        }
