"""Test-only reference code for the SSD tests, written from shared/reference/book-ssd.md.

- ``BOOK_SSD300_KEYS``: the spec's section 3.2 table (book key, shape, torchvision key), 71 rows, book order.
- ``book_dbox_list``, ``book_decode``, ``book_nm_suppression``, ``book_detect``: straightforward loop versions
  of the book's ``DBox.make_dbox_list``, ``decode``, ``nm_suppression`` and ``Detect.forward`` (spec sections
  2.3-2.6), kept deliberately close to the described algorithm rather than fast.
- ``init_random_``: seeded random weights that keep activations of order 1 for the book's 0-255 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: book-ssd.md section 3.2, SSD300 with 21 classes: (book / amdegroot key, shape, torchvision key).
BOOK_SSD300_KEYS: list[tuple[str, tuple[int, ...], str]] = [
    ("vgg.0.weight", (64, 3, 3, 3), "backbone.features.0.weight"),
    ("vgg.0.bias", (64,), "backbone.features.0.bias"),
    ("vgg.2.weight", (64, 64, 3, 3), "backbone.features.2.weight"),
    ("vgg.2.bias", (64,), "backbone.features.2.bias"),
    ("vgg.5.weight", (128, 64, 3, 3), "backbone.features.5.weight"),
    ("vgg.5.bias", (128,), "backbone.features.5.bias"),
    ("vgg.7.weight", (128, 128, 3, 3), "backbone.features.7.weight"),
    ("vgg.7.bias", (128,), "backbone.features.7.bias"),
    ("vgg.10.weight", (256, 128, 3, 3), "backbone.features.10.weight"),
    ("vgg.10.bias", (256,), "backbone.features.10.bias"),
    ("vgg.12.weight", (256, 256, 3, 3), "backbone.features.12.weight"),
    ("vgg.12.bias", (256,), "backbone.features.12.bias"),
    ("vgg.14.weight", (256, 256, 3, 3), "backbone.features.14.weight"),
    ("vgg.14.bias", (256,), "backbone.features.14.bias"),
    ("vgg.17.weight", (512, 256, 3, 3), "backbone.features.17.weight"),
    ("vgg.17.bias", (512,), "backbone.features.17.bias"),
    ("vgg.19.weight", (512, 512, 3, 3), "backbone.features.19.weight"),
    ("vgg.19.bias", (512,), "backbone.features.19.bias"),
    ("vgg.21.weight", (512, 512, 3, 3), "backbone.features.21.weight"),
    ("vgg.21.bias", (512,), "backbone.features.21.bias"),
    ("vgg.24.weight", (512, 512, 3, 3), "backbone.extra.0.1.weight"),
    ("vgg.24.bias", (512,), "backbone.extra.0.1.bias"),
    ("vgg.26.weight", (512, 512, 3, 3), "backbone.extra.0.3.weight"),
    ("vgg.26.bias", (512,), "backbone.extra.0.3.bias"),
    ("vgg.28.weight", (512, 512, 3, 3), "backbone.extra.0.5.weight"),
    ("vgg.28.bias", (512,), "backbone.extra.0.5.bias"),
    ("vgg.31.weight", (1024, 512, 3, 3), "backbone.extra.0.7.1.weight"),
    ("vgg.31.bias", (1024,), "backbone.extra.0.7.1.bias"),
    ("vgg.33.weight", (1024, 1024, 1, 1), "backbone.extra.0.7.3.weight"),
    ("vgg.33.bias", (1024,), "backbone.extra.0.7.3.bias"),
    ("extras.0.weight", (256, 1024, 1, 1), "backbone.extra.1.0.weight"),
    ("extras.0.bias", (256,), "backbone.extra.1.0.bias"),
    ("extras.1.weight", (512, 256, 3, 3), "backbone.extra.1.2.weight"),
    ("extras.1.bias", (512,), "backbone.extra.1.2.bias"),
    ("extras.2.weight", (128, 512, 1, 1), "backbone.extra.2.0.weight"),
    ("extras.2.bias", (128,), "backbone.extra.2.0.bias"),
    ("extras.3.weight", (256, 128, 3, 3), "backbone.extra.2.2.weight"),
    ("extras.3.bias", (256,), "backbone.extra.2.2.bias"),
    ("extras.4.weight", (128, 256, 1, 1), "backbone.extra.3.0.weight"),
    ("extras.4.bias", (128,), "backbone.extra.3.0.bias"),
    ("extras.5.weight", (256, 128, 3, 3), "backbone.extra.3.2.weight"),
    ("extras.5.bias", (256,), "backbone.extra.3.2.bias"),
    ("extras.6.weight", (128, 256, 1, 1), "backbone.extra.4.0.weight"),
    ("extras.6.bias", (128,), "backbone.extra.4.0.bias"),
    ("extras.7.weight", (256, 128, 3, 3), "backbone.extra.4.2.weight"),
    ("extras.7.bias", (256,), "backbone.extra.4.2.bias"),
    ("L2Norm.weight", (512,), "backbone.scale_weight"),
    ("loc.0.weight", (16, 512, 3, 3), "head.regression_head.module_list.0.weight"),
    ("loc.0.bias", (16,), "head.regression_head.module_list.0.bias"),
    ("loc.1.weight", (24, 1024, 3, 3), "head.regression_head.module_list.1.weight"),
    ("loc.1.bias", (24,), "head.regression_head.module_list.1.bias"),
    ("loc.2.weight", (24, 512, 3, 3), "head.regression_head.module_list.2.weight"),
    ("loc.2.bias", (24,), "head.regression_head.module_list.2.bias"),
    ("loc.3.weight", (24, 256, 3, 3), "head.regression_head.module_list.3.weight"),
    ("loc.3.bias", (24,), "head.regression_head.module_list.3.bias"),
    ("loc.4.weight", (16, 256, 3, 3), "head.regression_head.module_list.4.weight"),
    ("loc.4.bias", (16,), "head.regression_head.module_list.4.bias"),
    ("loc.5.weight", (16, 256, 3, 3), "head.regression_head.module_list.5.weight"),
    ("loc.5.bias", (16,), "head.regression_head.module_list.5.bias"),
    ("conf.0.weight", (84, 512, 3, 3), "head.classification_head.module_list.0.weight"),
    ("conf.0.bias", (84,), "head.classification_head.module_list.0.bias"),
    ("conf.1.weight", (126, 1024, 3, 3), "head.classification_head.module_list.1.weight"),
    ("conf.1.bias", (126,), "head.classification_head.module_list.1.bias"),
    ("conf.2.weight", (126, 512, 3, 3), "head.classification_head.module_list.2.weight"),
    ("conf.2.bias", (126,), "head.classification_head.module_list.2.bias"),
    ("conf.3.weight", (126, 256, 3, 3), "head.classification_head.module_list.3.weight"),
    ("conf.3.bias", (126,), "head.classification_head.module_list.3.bias"),
    ("conf.4.weight", (84, 256, 3, 3), "head.classification_head.module_list.4.weight"),
    ("conf.4.bias", (84,), "head.classification_head.module_list.4.bias"),
    ("conf.5.weight", (84, 256, 3, 3), "head.classification_head.module_list.5.weight"),
    ("conf.5.bias", (84,), "head.classification_head.module_list.5.bias"),
]


def init_random_(model: nn.Module, seed: int, first_conv_scale: float = 1 / 64) -> None:
    """Seeded He-normal weights and small random biases for every conv, in module order; the first conv
    is scaled by ``first_conv_scale`` so 0-255 inputs give activations of order 1 all the way down."""
    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            assert conv.bias is not None
            conv.bias.copy_((torch.rand(conv.bias.shape, generator=gen) - 0.5) * 0.2)
        convs[0].weight.mul_(first_conv_scale)


def book_dbox_list(
    input_size: int,
    feature_maps: Sequence[int],
    steps: Sequence[int],
    min_sizes: Sequence[float],
    max_sizes: Sequence[float],
    aspect_ratios: Sequence[Sequence[int]],
) -> Tensor:
    """The book's DBox.make_dbox_list (spec 2.3): Python float loops, float32 tensor, clamp of all columns."""
    mean: list[float] = []
    for k, f in enumerate(feature_maps):
        for i, j in product(range(f), repeat=2):
            f_k = input_size / steps[k]
            cx = (j + 0.5) / f_k
            cy = (i + 0.5) / f_k
            s_k = min_sizes[k] / input_size
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (max_sizes[k] / input_size))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in aspect_ratios[k]:
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    output = torch.tensor(mean, dtype=torch.float32).view(-1, 4)
    return output.clamp(min=0, max=1)


def book_decode(loc: Tensor, dbox: Tensor) -> Tensor:
    """Spec 2.4: loc (A, 4), dbox (A, 4) cxcywh -> (A, 4) xyxy; variances 0.1 / 0.2, no clamp."""
    boxes = torch.cat(
        (dbox[:, :2] + loc[:, :2] * 0.1 * dbox[:, 2:], dbox[:, 2:] * torch.exp(loc[:, 2:] * 0.2)), dim=1
    )
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def book_nm_suppression(boxes: Tensor, scores: Tensor, overlap: float = 0.45, top_k: int = 200) -> list[int]:
    """Spec 2.5: greedy NMS of one class over its top_k candidates; indices into ``boxes`` by score desc.
    A candidate survives while its IoU with every kept box is <= overlap (a NaN IoU removes it)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    idx = scores.sort(0).indices[-top_k:]  # ascending; the best is last
    keep: list[int] = []
    while idx.numel() > 0:
        i = int(idx[-1])
        keep.append(i)
        idx = idx[:-1]
        if idx.numel() == 0:
            break
        xx1 = x1[idx].clamp(min=float(x1[i]))
        yy1 = y1[idx].clamp(min=float(y1[i]))
        xx2 = x2[idx].clamp(max=float(x2[i]))
        yy2 = y2[idx].clamp(max=float(y2[i]))
        inter = (xx2 - xx1).clamp(min=0.0) * (yy2 - yy1).clamp(min=0.0)
        union = (area[idx] - inter) + area[i]
        iou = inter / union
        idx = idx[iou.le(overlap)]
    return keep


def book_detect(
    loc: Tensor,
    conf_logits: Tensor,
    dbox: Tensor,
    conf_thresh: float = 0.01,
    top_k: int = 200,
    nms_thresh: float = 0.45,
) -> Tensor:
    """Spec 2.6: loc (B, A, 4), conf_logits (B, A, C) -> (B, C, top_k, 5) rows (score, x1, y1, x2, y2),
    normalised, unclipped, score-descending within each class; class 0 and unused rows are zero."""
    batch, _, num_classes = conf_logits.shape
    conf = F.softmax(conf_logits, dim=-1)
    output = torch.zeros(batch, num_classes, top_k, 5)
    for i in range(batch):
        decoded = book_decode(loc[i], dbox)
        for cl in range(1, num_classes):
            mask = conf[i, :, cl] > conf_thresh
            scores = conf[i, mask, cl]
            if scores.numel() == 0:
                continue
            boxes = decoded[mask]
            keep = book_nm_suppression(boxes, scores, nms_thresh, top_k)
            output[i, cl, : len(keep)] = torch.cat((scores[keep, None], boxes[keep]), dim=1)
    return output
