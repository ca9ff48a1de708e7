"""How closely one model's answers reproduce another's on the same images.

Used wherever a second version of a model must answer like the first: int8 against fp32
(``models.quantize``), another runtime against torch, a reloaded checkpoint against the one it
replaces (the service's ``verify_dir``). :func:`reference_outputs` runs a predictor on images;
:func:`agreement_report` compares two such outputs; :func:`apply_with_report` changes a predictor
(quantizes it, moves it to another runtime) and reports how closely the result answers like the
predictor it was: the service's agreement check at start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

from models.errors import ModelConfigError
from models.preprocess import calibration_batches
from models.types import DetectOutput, DetectParams

if TYPE_CHECKING:
    from models.predictors import Predictor

__all__ = [
    "HIGH_IOU",
    "MATCH_IOU",
    "agreement_report",
    "apply_with_report",
    "high_iou_recall",
    "reference_outputs",
]

#: A reference detection and a candidate one of the same class match at this IoU or more.
MATCH_IOU = 0.5
#: The stricter bar of the agreement check at start (issue 15): the same box, not a neighbour.
HIGH_IOU = 0.9

#: a Classifier or a Detector: :func:`apply_with_report` returns what ``change`` returns
P = TypeVar("P", bound="Predictor[Any, Any]")


def reference_outputs(
    predictor: Predictor[Any, Any], images: Sequence[Image.Image], batch_size: int = 8
) -> Tensor | list[DetectOutput]:
    """Logits (classifier) or every detection above 0.01 (detector) of ``predictor`` on ``images``."""
    from models.predictors import Detector  # the predictors module imports nothing from here

    rgb = [image.convert("RGB") for image in images]
    batches = calibration_batches(rgb, predictor.preprocess, batch_size)
    if isinstance(predictor, Detector):
        outputs: list[DetectOutput] = []
        params = DetectParams(score_threshold=0.0, max_detections=None)
        for start, batch in zip(range(0, len(rgb), batch_size), batches, strict=True):
            sizes = [image.size for image in rgb[start : start + batch_size]]
            outputs.extend(predictor.predict(batch, sizes, [params] * len(sizes)))
        return outputs
    with torch.inference_mode():
        logits = [
            predictor.model(b.to(predictor.device, predictor.dtype, memory_format=torch.channels_last))
            for b in batches
        ]
    return torch.cat(logits).float().cpu()


def agreement_report(
    reference: Tensor | Sequence[DetectOutput],
    candidate: Tensor | Sequence[DetectOutput],
    *,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """How closely ``candidate`` (e.g. int8) reproduces ``reference`` (fp32) on the same images.

    Classifiers: ``reference`` and ``candidate`` are logits (FloatTensor[N, C]); scores are their softmax.
    Returns ``images``; ``top1_agreement`` (fraction of images with the same arg-max); ``score_diff_max``
    (largest |p_ref - p_cand| over all images and classes); ``top1_score_diff_max`` and
    ``top1_score_diff_mean`` (|p_ref - p_cand| at the reference's top-1 class, over images).

    Detectors: one :class:`~models.types.DetectOutput` per image each, in the same pixel frame. Reference
    detections with score >= ``score_threshold`` are matched greedily, highest score first, to the unused
    candidate detection (any score) of the same class with the highest IoU, if that IoU >= 0.5. Returns
    ``images``; ``reference_detections`` (those above the threshold); ``matched``; ``recall`` (matched /
    reference, None without reference detections); ``score_diff_max`` / ``score_diff_mean`` (|score
    difference| over matched pairs) and ``box_diff_max_px`` / ``box_diff_mean_px`` (per pair the largest
    |coordinate difference| in pixels, then its max / mean over pairs), None without matches;
    ``extra_detections`` (candidate detections >= ``score_threshold`` left unmatched);
    ``high_iou_recall`` (:func:`high_iou_recall`: found again at IoU >= :data:`HIGH_IOU`).

    NMS makes the matching approximate: where the reference keeps one of several near-equal boxes, the
    candidate may keep a neighbour, which then matches with a larger box difference (IoU >= 0.5 still).
    """
    if isinstance(reference, Tensor) and isinstance(candidate, Tensor):
        return _classifier_agreement(reference, candidate)
    if isinstance(reference, Tensor) or isinstance(candidate, Tensor):
        raise TypeError(
            "compare logits with logits (Tensor[N, C]) or detections with detections (DetectOutput lists)"
        )
    return _detector_agreement(reference, candidate, score_threshold)


def _classifier_agreement(reference: Tensor, candidate: Tensor) -> dict[str, Any]:
    if reference.dim() != 2 or reference.shape != candidate.shape or reference.shape[0] == 0:
        raise ValueError(
            f"expected two logit tensors [N, C] of one shape with N >= 1, got {list(reference.shape)} "
            f"and {list(candidate.shape)}"
        )
    p_ref = F.softmax(reference.detach().float().cpu(), dim=1)  # (N, C)
    p_cand = F.softmax(candidate.detach().float().cpu(), dim=1)
    top1 = p_ref.argmax(dim=1)  # (N,)
    diff = (p_ref - p_cand).abs()  # (N, C)
    top1_diff = diff.gather(1, top1[:, None]).squeeze(1)  # (N,)
    return {
        "images": reference.shape[0],
        "top1_agreement": float((top1 == p_cand.argmax(dim=1)).float().mean()),
        "score_diff_max": float(diff.max()),
        "top1_score_diff_max": float(top1_diff.max()),
        "top1_score_diff_mean": float(top1_diff.mean()),
    }


def _match(ref: DetectOutput, cand: DetectOutput, score_threshold: float) -> list[tuple[int, int]]:
    """Greedy matching: (reference index, candidate index) pairs, see :func:`agreement_report`."""
    keep = (ref.scores >= score_threshold).nonzero().squeeze(1)
    order = keep[ref.scores[keep].argsort(descending=True, stable=True)]
    if order.numel() == 0 or cand.boxes.shape[0] == 0:
        return []
    iou = box_iou(ref.boxes[order].float(), cand.boxes.float())  # (R, M)
    same_class = ref.class_ids[order][:, None] == cand.class_ids[None, :]  # (R, M)
    iou = torch.where(same_class, iou, torch.full_like(iou, -1.0))
    used = torch.zeros(cand.boxes.shape[0], dtype=torch.bool)
    pairs: list[tuple[int, int]] = []
    for row, r in enumerate(order.tolist()):
        best = iou[row].masked_fill(used, -1.0).max(dim=0)
        if float(best.values) >= MATCH_IOU:
            used[best.indices] = True
            pairs.append((r, int(best.indices)))
    return pairs


def _detector_agreement(
    reference: Sequence[DetectOutput], candidate: Sequence[DetectOutput], score_threshold: float
) -> dict[str, Any]:
    if len(reference) != len(candidate) or len(reference) == 0:
        raise ValueError(
            f"expected one DetectOutput per image on each side, got {len(reference)} and {len(candidate)}"
        )
    n_ref = n_extra = 0
    score_diffs: list[float] = []
    box_diffs: list[float] = []
    for ref, cand in zip(reference, candidate, strict=True):
        pairs = _match(ref, cand, score_threshold)
        n_ref += int((ref.scores >= score_threshold).sum())
        matched_cand = {c for _, c in pairs}
        n_extra += sum(
            1 for j, s in enumerate(cand.scores.tolist()) if s >= score_threshold and j not in matched_cand
        )
        for r, c in pairs:
            score_diffs.append(abs(float(ref.scores[r]) - float(cand.scores[c])))
            box_diffs.append(float((ref.boxes[r].float() - cand.boxes[c].float()).abs().max()))
    matched = len(score_diffs)
    return {
        "images": len(reference),
        "reference_detections": n_ref,
        "matched": matched,
        "recall": matched / n_ref if n_ref else None,
        "score_diff_max": max(score_diffs) if matched else None,
        "score_diff_mean": sum(score_diffs) / matched if matched else None,
        "box_diff_max_px": max(box_diffs) if matched else None,
        "box_diff_mean_px": sum(box_diffs) / matched if matched else None,
        "extra_detections": n_extra,
        "high_iou_recall": high_iou_recall(reference, candidate, score_threshold=score_threshold),
    }


def high_iou_recall(
    reference: Sequence[DetectOutput],
    candidate: Sequence[DetectOutput],
    *,
    iou: float = HIGH_IOU,
    score_threshold: float = 0.5,
) -> float | None:
    """The fraction of ``reference`` detections with score >= ``score_threshold`` that have a
    ``candidate`` detection of the same class (any score) overlapping them at IoU >= ``iou``, over
    images in order; None when the reference has no such detection. Unlike the greedy matching of
    :func:`agreement_report`, a candidate box may serve several reference boxes: this asks "is the
    same box still there", not "how many boxes correspond"."""
    if len(reference) != len(candidate):
        raise ValueError(f"one output per image on each side, got {len(reference)} and {len(candidate)}")
    total = found = 0
    for ref, cand in zip(reference, candidate, strict=True):
        keep = ref.scores >= score_threshold
        total += int(keep.sum())
        if cand.boxes.shape[0] == 0 or not bool(keep.any()):
            continue
        overlap = box_iou(ref.boxes[keep].float(), cand.boxes.float())  # (R, M)
        same = ref.class_ids[keep][:, None] == cand.class_ids[None, :]  # (R, M)
        found += int(((overlap >= iou) & same).any(dim=1).sum())
    return found / total if total else None


def apply_with_report(
    predictor: P,
    images: Sequence[Image.Image],
    change: Callable[[P], P],
    *,
    report_images: int = 16,
    batch_size: int = 8,
) -> tuple[P, dict[str, Any]]:
    """``change(predictor)``, and :func:`agreement_report` of the changed predictor against the
    predictor as it was, on the first ``report_images`` of ``images``.

    Used with the calibration images, this is an in-sample figure: it shows a broken conversion or
    calibration at once, but a held-out set of the model's own images is the real measure. Raises
    ModelConfigError without images.
    """
    sample = list(images[:report_images])
    if not sample:
        raise ModelConfigError("the agreement check needs at least one image of the model's own kind")
    reference = reference_outputs(predictor, sample, batch_size)
    changed = change(predictor)
    candidate = reference_outputs(changed, sample, batch_size)
    return changed, agreement_report(reference, candidate)
