"""Detection mAP through torchmetrics' ``MeanAveragePrecision`` (the COCO evaluation).

``map_50`` is the mean over classes of AP at IoU 0.5 and ``map`` the mean of AP over IoU 0.50,
0.55 .. 0.95 (COCO's AP@[.5:.95]). Both use COCO's 101-point interpolated precision, which
differs slightly from VOC2010's all-point AP for the same detections (and more from VOC2007's
11-point AP). Classes without any ground truth in the set are left out of the means, as COCO
does. The backend is faster-coco-eval when installed, else pycocotools.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DetectionMAP", "coco_backend", "evaluate_checkpoint"]


def coco_backend() -> str:
    """The COCO evaluation package torchmetrics will use; SystemExit naming both if neither is there."""
    for module, name in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise SystemExit("error: mAP needs faster-coco-eval or pycocotools: pip install faster-coco-eval")


class DetectionMAP:
    """Accumulate per-image detections and ground truths; :meth:`compute` gives the mAPs.

    Boxes (Tensor[N, 4]) are [x1, y1, x2, y2] in any one unit (pixels here); class ids are the
    model's label positions.
    """

    def __init__(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision  # ~2 s to import; only when evaluating

        backend = coco_backend()
        self._metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                            backend=backend)  # type: ignore[arg-type]
        self._metric_50 = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                               iou_thresholds=[0.5], backend=backend)  # type: ignore[arg-type]
        self.images = 0

    def add(self, boxes: Tensor, scores: Tensor, class_ids: Tensor, truth_boxes: Tensor,
            truth_ids: Tensor) -> None:
        """One image: its detections and its ground truths."""
        preds = [{"boxes": boxes.float().cpu().reshape(-1, 4), "scores": scores.float().cpu(),
                  "labels": class_ids.long().cpu()}]
        truths = [{"boxes": truth_boxes.float().cpu().reshape(-1, 4), "labels": truth_ids.long().cpu()}]
        self._metric.update(preds, truths)
        self._metric_50.update(preds, truths)
        self.images += 1

    def compute(self) -> dict[str, Any]:
        """{"map_50", "map_75", "map": float (-1 when there is no ground truth at all),
        "per_class": {class id (str): {"ap_50": AP at IoU 0.5, "ap": AP@[.5:.95]}}}."""
        result = self._metric.compute()
        result_50 = self._metric_50.compute()
        per_class: dict[str, dict[str, float]] = {}
        for key, res in (("ap", result), ("ap_50", result_50)):
            classes = res["classes"].reshape(-1).tolist()
            values = res["map_per_class"].reshape(-1).tolist()
            for c, ap in zip(classes, values, strict=True):
                per_class.setdefault(str(int(c)), {})[key] = float(ap)
        return {
            "map_50": float(result["map_50"]),
            "map_75": float(result["map_75"]),
            "map": float(result["map"]),
            "per_class": per_class,
        }


def evaluate_checkpoint(weights: Path, data: Path, split: str = "val", batch_size: int = 16,
                        labels_file: Path | None = None, show: bool = True, precision: str = "fp32",
                        calibration: Path | None = None) -> dict[str, Any]:
    """Score a project checkpoint on a held-out split exactly as the service would answer.

    The file is loaded with ``models.load_model`` (format "project", CPU) and every image goes
    through the predictor's own ``preprocess`` and ``predict``. Classifiers: top-1 accuracy on
    ``data/<split>/<class>/*`` (folders matched to the checkpoint's labels by name). Detectors: mAP
    on the VOC split ``data/ImageSets/Main/<split>.txt`` (difficult objects left out), detections
    with score >= 0.01, at most 100 per image.

    ``precision`` other than fp32 (``bf16``, or ``int8`` calibrated on the images in
    ``calibration``, as the service's VISION_PRECISION=int8 does) adds ``agreement``: the same
    held-out images through an fp32 copy, compared by ``models.quantize.agreement_report`` (top-1
    agreement and score differences; detections matched at IoU 0.5 with score and box differences).
    """
    from PIL import Image

    from models import Classifier, Detector, DetectParams, ModelSpec, load_model
    from models.checkpoints import read_checkpoint
    from models.quantize import agreement_report, load_calibration_images, quantize_predictor
    from train.common import progress

    if precision not in ("fp32", "bf16", "int8"):
        raise SystemExit(f"error: precision must be fp32, bf16 or int8 on the CPU, not {precision!r}")
    if precision == "int8" and calibration is None:
        raise SystemExit("error: --precision int8 needs --calibration DIR (images of the model's own kind)")
    obj, _ = read_checkpoint(weights)
    if not (isinstance(obj, dict) and obj.get("format") == "vision-serve"):
        raise SystemExit(f"error: {weights} is not a project checkpoint (python -m train writes those)")
    spec = ModelSpec(name="evaluate", task=obj["task"], arch=obj["arch"], format="project", weights=weights)
    predictor = load_model(spec, "cpu", precision="bf16" if precision == "bf16" else "fp32")
    if precision == "int8":
        assert calibration is not None
        quantize_predictor(predictor, load_calibration_images(calibration))
    reference = load_model(spec, "cpu") if precision != "fp32" else None  # fp32, for the agreement
    labels = predictor.info.labels
    extra: dict[str, Any] = {"precision": precision}
    if calibration is not None and precision == "int8":
        extra["calibration"] = str(calibration)
    if isinstance(predictor, Classifier):
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(data / split))
        unknown = [c for c in folder.classes if c not in labels]
        if unknown:
            raise SystemExit(f"error: {data / split} has classes {unknown} that {weights} "
                             f"does not know ({labels})")
        correct = 0
        per_class = {c: [0, 0] for c in folder.classes}
        logits: dict[str, list[Tensor]] = {"reference": [], "candidate": []}
        batches = [folder.samples[i:i + batch_size] for i in range(0, len(folder.samples), batch_size)]
        for batch in progress(batches, show, f"{split} top-1"):
            images = []
            for path, _ in batch:
                with Image.open(path) as file:
                    images.append(predictor.preprocess(file.convert("RGB")))
            stacked = torch.stack(images)
            outputs = predictor.predict(stacked, top_k=1)
            for (_, index), output in zip(batch, outputs, strict=True):
                name = folder.classes[index]
                hit = labels[int(output.class_ids[0])] == name
                correct += hit
                per_class[name][0] += hit
                per_class[name][1] += 1
            if reference is not None:
                logits["candidate"].append(_logits(predictor, stacked))
                logits["reference"].append(_logits(reference, stacked))
        total = len(folder.samples)
        if reference is not None:
            extra["agreement"] = agreement_report(torch.cat(logits["reference"]),
                                                  torch.cat(logits["candidate"]))
        return {"task": "classify", "images": total, "top1": correct / max(total, 1),
                "per_class": {c: hits / max(n, 1) for c, (hits, n) in per_class.items()}, **extra}

    from train.detector import read_annotation

    assert isinstance(predictor, Detector)

    ids_file = data / "ImageSets" / "Main" / f"{split}.txt"
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    metric = DetectionMAP()
    params = DetectParams(score_threshold=0.01, iou_threshold=None, max_detections=100)
    found_all: dict[str, list[Any]] = {"reference": [], "candidate": []}
    for start in progress(range(0, len(ids), batch_size), show, f"{split} mAP"):
        chunk = ids[start:start + batch_size]
        images, sizes, truths = [], [], []
        for image_id in chunk:
            with Image.open(data / "JPEGImages" / f"{image_id}.jpg") as file:
                image = file.convert("RGB")
            images.append(predictor.preprocess(image))
            sizes.append(image.size)
            truths.append(read_annotation(data / "Annotations" / f"{image_id}.xml", labels))
        stacked = torch.stack(images)
        detections = predictor.predict(stacked, sizes, [params] * len(chunk))
        for found, truth in zip(detections, truths, strict=True):
            metric.add(found.boxes, found.scores, found.class_ids, torch.from_numpy(truth.boxes),
                       torch.from_numpy(truth.labels))
        if reference is not None:
            found_all["candidate"].extend(detections)
            found_all["reference"].extend(reference.predict(stacked, sizes, [params] * len(chunk)))
    result = metric.compute()
    result["per_class"] = {labels[int(c)]: v for c, v in result["per_class"].items()}
    if reference is not None:
        extra["agreement"] = agreement_report(found_all["reference"], found_all["candidate"])
    return {"task": "detect", "images": len(ids), **result, **extra}


def _logits(predictor: Any, batch: Tensor) -> Tensor:
    """The classifier network's raw outputs for a preprocessed batch, as float32 on the CPU."""
    with torch.inference_mode():
        out = predictor.model(batch.to(predictor.device, predictor.dtype).contiguous(
            memory_format=torch.channels_last))
    return out.float().cpu()
