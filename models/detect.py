"""SSD post-processing: head outputs -> scored boxes in pixels of the original images.

Two semantics share one batched implementation (book-ssd.md sections 2.4-2.6 and 3.4):

- ``BOOK_POSTPROCESS``: the book's ``decode`` + ``Detect`` + ``nm_suppression`` (= ssd.pytorch): softmax,
  per class score > 0.01, the top 200 of a class enter greedy NMS that keeps IoU <= 0.45, no overall cap,
  no clamp on exp, NMS on unclipped boxes.
- ``TORCHVISION_POSTPROCESS``: torchvision ``SSD.postprocess_detections``: dw, dh clamped at log(1000/16),
  boxes clipped to the image before scoring, top 400 per class, at most 200 per image after NMS.

Everything runs on the tensors' device with top-k, gather and ``torchvision.ops.batched_nms``; the only
Python loops are over images (to split the result) and over the distinct IoU thresholds of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from models.types import DetectOutput, DetectParams

__all__ = [
    "BOOK_POSTPROCESS",
    "TORCHVISION_POSTPROCESS",
    "Detections",
    "PostprocessConfig",
    "decode",
    "postprocess",
    "select_detections",
]


@dataclass(frozen=True)
class PostprocessConfig:
    """Model-side post-processing constants (per-request ones are in ``DetectParams``)."""

    conf_threshold: float = 0.01  # a class score must be strictly greater
    pre_nms_top_k: int = 200  # per image and class, before NMS
    nms_iou: float = 0.45  # suppress IoU > this (IoU <= nms_iou is kept)
    max_per_image: int | None = None  # overall cap after NMS (book: none; torchvision: 200)
    clamp_log_wh: float | None = None  # upper clamp on the log(w), log(h) scale before exp (torchvision)
    clip_before_nms: bool = False  # clip boxes to the image before scoring and NMS (torchvision)


#: The book's Detect(conf_thresh=0.01, top_k=200, nms_thresh=0.45) (ssd_model.py:633-720).
BOOK_POSTPROCESS = PostprocessConfig()

#: torchvision ssd300_vgg16 defaults: score_thresh=0.01, topk_candidates=400, nms_thresh=0.45,
#: detections_per_img=200 (detection/ssd.py); BoxCoder bbox_xform_clip = log(1000 / 16) (detection/_utils.py).
TORCHVISION_POSTPROCESS = PostprocessConfig(
    conf_threshold=0.01,
    pre_nms_top_k=400,
    nms_iou=0.45,
    max_per_image=200,
    clamp_log_wh=math.log(1000.0 / 16),
    clip_before_nms=True,
)

# NMS runs on boxes clamped to +-this many image sizes: torchvision's batched_nms separates classes by
# shifting them apart by the largest coordinate, so one absurd box (an untrained model's exp(50)) would
# otherwise swamp every other box's precision. No IoU a real model produces is changed by the clamp.
_NMS_COORD_LIMIT = 1e4


def decode(
    loc: Tensor,
    priors: Tensor,
    variances: tuple[float, float] = (0.1, 0.2),
    clamp_log_wh: float | None = None,
) -> Tensor:
    """Apply box offsets to default boxes (the book's ``decode``; paper eq. 2 inverted).

    Args:
        loc (Tensor[..., A, 4]): raw offsets (dcx, dcy, dw, dh) from the network.
        priors (Tensor[A, 4]): default boxes in (cx, cy, w, h), normalised.
        variances: the SSD "variances" scaling the centre and size offsets.
        clamp_log_wh: if set, ``dw * variances[1]`` and ``dh * variances[1]`` are clamped to at most this
            before exp (torchvision); the book does not clamp.

    Returns:
        boxes (Tensor[..., A, 4]) in [x1, y1, x2, y2], normalised, unclipped; float32 (float64 if loc is).
    """
    if priors.dim() != 2 or priors.shape[1] != 4 or loc.dim() < 2 or loc.shape[-2:] != priors.shape:
        shapes = f"{list(loc.shape)} and {list(priors.shape)}"
        raise ValueError(f"decode needs loc [..., A, 4] and priors [A, 4], got {shapes}")
    dtype = torch.promote_types(loc.dtype, torch.float32)
    loc = loc.to(dtype)
    priors = priors.to(device=loc.device, dtype=dtype)
    centres = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    log_scale = loc[..., 2:] * variances[1]
    if clamp_log_wh is not None:
        log_scale = log_scale.clamp(max=clamp_log_wh)
    sizes = priors[:, 2:] * torch.exp(log_scale)
    top_left = centres - sizes / 2
    return torch.cat((top_left, top_left + sizes), dim=-1)


class Detections(NamedTuple):
    """Detections of a batch, flat, sorted by image then score descending.

    boxes (FloatTensor[N, 4]) in [x1, y1, x2, y2], normalised (clipped to [0, 1] only with
    ``clip_before_nms``); scores (FloatTensor[N]); labels (LongTensor[N]) network classes >= 1;
    image (LongTensor[N]) batch index of each detection.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image: Tensor


def _sort_by_image_then_score(image: Tensor, scores: Tensor) -> Tensor:
    """Permutation that orders detections by image ascending, then score descending."""
    order = scores.argsort(descending=True, stable=True)
    return order[image[order].argsort(stable=True)]


def _rank_in_image(image: Tensor, num_images: int) -> Tensor:
    """Position of each detection within its image, for ``image`` sorted ascending."""
    counts = torch.bincount(image, minlength=num_images)
    starts = counts.cumsum(0) - counts
    return torch.arange(image.numel(), device=image.device) - starts[image]


def _nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each group; returns kept indices, score descending.

    Runs in float64 (where the device has it) on boxes translated to non-negative coordinates, because
    ``batched_nms`` assumes 0 <= x1 and may offset groups by large amounts; IoU is translation invariant.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    dtype = torch.float32 if boxes.device.type == "mps" else torch.float64
    work = boxes.to(dtype).clamp(min=-_NMS_COORD_LIMIT, max=_NMS_COORD_LIMIT)
    work = work - work.min()
    keep: Tensor = batched_nms(work, scores.to(dtype), groups, iou_threshold)
    return keep


def select_detections(
    loc: Tensor,
    conf_logits: Tensor,
    priors: Tensor,
    iou_thresholds: Sequence[float],
    config: PostprocessConfig = BOOK_POSTPROCESS,
    variances: tuple[float, float] = (0.1, 0.2),
) -> Detections:
    """Scores, per-class candidate selection, NMS and the overall cap, batched; all in normalised units.

    Args:
        loc (Tensor[B, A, 4]) raw offsets; conf_logits (Tensor[B, A, C]) raw logits, class 0 = background;
        priors (Tensor[A, 4]) default boxes (cx, cy, w, h); iou_thresholds: one NMS threshold per image.

    For every image and class c >= 1: candidates with softmax score > ``conf_threshold`` (and finite boxes),
    the top ``pre_nms_top_k`` of them, greedy NMS suppressing IoU > the image's threshold; then at most
    ``max_per_image`` highest-scoring detections per image. Computed in float32 whatever the input dtype.
    """
    shapes_ok = loc.dim() == 3 and conf_logits.dim() == 3 and loc.shape[2] == 4
    if not shapes_ok or loc.shape[:2] != conf_logits.shape[:2]:
        shapes = f"{list(loc.shape)} and {list(conf_logits.shape)}"
        raise ValueError(f"expected loc [B, A, 4] and conf [B, A, C], got {shapes}")
    batch, num_anchors, num_classes = conf_logits.shape
    if num_classes < 2:
        raise ValueError(f"conf must have background plus at least one class, got {num_classes} classes")
    if len(iou_thresholds) != batch:
        raise ValueError(f"{len(iou_thresholds)} IoU thresholds for a batch of {batch}")
    device = loc.device

    scores = F.softmax(conf_logits.float(), dim=-1)[..., 1:]  # (B, A, C-1); background dropped
    boxes = decode(loc.float(), priors, variances, config.clamp_log_wh)  # (B, A, 4)
    if config.clip_before_nms:
        boxes = boxes.clamp(min=0.0, max=1.0)
    ok = (scores > config.conf_threshold) & torch.isfinite(boxes).all(dim=-1, keepdim=True)  # (B, A, C-1)

    # per image and class: the top-k candidates by score (threshold first, so failing ones sort last)
    k = min(config.pre_nms_top_k, num_anchors)
    top_scores, top_idx = scores.masked_fill(~ok, -1.0).transpose(1, 2).topk(k, dim=-1)  # (B, C-1, k)
    valid = ok.transpose(1, 2).gather(-1, top_idx)  # (B, C-1, k)
    image_ids = torch.arange(batch, device=device)[:, None, None].expand_as(top_idx)
    class_ids = torch.arange(1, num_classes, device=device)[None, :, None].expand_as(top_idx)
    cand_boxes = boxes[image_ids, top_idx][valid]  # (B, C-1, k, 4) -> (N, 4)
    cand_scores, cand_image, cand_class = top_scores[valid], image_ids[valid], class_ids[valid]
    groups = cand_image * num_classes + cand_class

    kept: list[Tensor] = []
    thresholds = torch.tensor(iou_thresholds, dtype=torch.float64)
    for iou in sorted(set(iou_thresholds)):
        in_batch = (thresholds == iou).to(device)[cand_image]
        idx = in_batch.nonzero().squeeze(1)
        kept.append(idx[_nms(cand_boxes[idx], cand_scores[idx], groups[idx], iou)])
    keep = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=device)
    keep = keep[_sort_by_image_then_score(cand_image[keep], cand_scores[keep])]
    if config.max_per_image is not None:
        keep = keep[_rank_in_image(cand_image[keep], batch) < config.max_per_image]
    return Detections(cand_boxes[keep], cand_scores[keep], cand_class[keep], cand_image[keep])


def postprocess(
    loc: Tensor,
    conf_logits: Tensor,
    priors: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    params: Sequence[DetectParams],
    config: PostprocessConfig = BOOK_POSTPROCESS,
    class_offset: int = 1,
    variances: tuple[float, float] = (0.1, 0.2),
) -> list[DetectOutput]:
    """SSD head outputs -> one ``DetectOutput`` per image, on the CPU.

    Args:
        loc (Tensor[B, A, 4]): raw offsets; conf_logits (Tensor[B, A, C]): raw logits, class 0 background
            (never reported). Any float dtype; computed in float32.
        priors (Tensor[A, 4]): default boxes (cx, cy, w, h), normalised (``models.anchors.default_boxes``).
        image_sizes: (width, height) of each ORIGINAL image; boxes are scaled to it.
        params: per image: ``iou_threshold`` (None: ``config.nms_iou``), ``score_threshold`` (kept if
            score >= it) and ``max_detections`` (None: no cap).
        config: ``BOOK_POSTPROCESS`` or ``TORCHVISION_POSTPROCESS`` semantics (see ``select_detections``).
        class_offset: subtracted from network classes to give ``class_ids``: 1 when the labels list leaves
            background out (the book's VOC list), 0 when it has it at index 0 (torchvision's COCO list).

    Each image's detections are scaled by (W, H), clipped to [0, W] x [0, H], dropped when empty
    (x2 <= x1 or y2 <= y1) or below the score threshold, sorted by score descending and capped.
    """
    batch = loc.shape[0]
    if len(image_sizes) != batch or len(params) != batch:
        raise ValueError(f"batch of {batch} with {len(image_sizes)} image sizes and {len(params)} params")
    device = loc.device
    ious = [config.nms_iou if p.iou_threshold is None else p.iou_threshold for p in params]
    det = select_detections(loc, conf_logits, priors, ious, config, variances)

    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device).reshape(batch, 2)  # (B, 2) = (W, H)
    limits = sizes[det.image].repeat(1, 2)  # (N, 4) = (W, H, W, H)
    boxes = torch.minimum((det.boxes * limits).clamp(min=0.0), limits)
    score_min = torch.tensor([p.score_threshold for p in params], dtype=torch.float32, device=device)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (det.scores >= score_min[det.image])
    boxes, scores, labels, image = boxes[keep], det.scores[keep], det.labels[keep], det.image[keep]
    # still sorted by image, then score descending
    caps = torch.tensor(
        [torch.iinfo(torch.int64).max if p.max_detections is None else p.max_detections for p in params],
        device=device,
    )
    keep = _rank_in_image(image, batch) < caps[image]
    boxes, scores, labels, image = (t[keep].cpu() for t in (boxes, scores, labels, image))

    counts = torch.bincount(image, minlength=batch).tolist()
    outputs = [
        DetectOutput(boxes=b, scores=s, class_ids=c - class_offset)
        for b, s, c in zip(*(torch.split(t, counts) for t in (boxes, scores, labels)), strict=True)
    ]
    if len(outputs) != batch:  # a cheap guard on the batch contract
        raise RuntimeError(f"post-processing produced {len(outputs)} outputs for {batch} images")
    return outputs
