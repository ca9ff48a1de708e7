"""SSD default boxes (priors), computed as the book's ``DBox.make_dbox_list`` (= ssd.pytorch ``PriorBox``).

Reference: SSD paper section 2.2 "Choosing scales and aspect ratios for default boxes"; the book's
ssd_model.py:431-485 (book-ssd.md section 2.3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.ssd import SSDConfig

__all__ = ["default_boxes"]


def _box_sizes(config: SSDConfig, k: int) -> list[tuple[float, float]]:
    """(w, h) of the boxes at one location of source k, normalised, in the book's order:
    [s, s', then for each aspect ratio a wide (s*sqrt(ar), s/sqrt(ar)) and a tall box]."""
    size = config.input_size
    s_k = config.min_sizes[k] / size
    s_prime = math.sqrt(s_k * (config.max_sizes[k] / size))
    sizes = [(s_k, s_k), (s_prime, s_prime)]
    for ar in config.aspect_ratios[k]:
        root = math.sqrt(ar)
        sizes += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
    return sizes


def default_boxes(config: SSDConfig) -> Tensor:
    """Default boxes of an SSD variant: FloatTensor[A, 4] in (cx, cy, w, h), normalised to the input size.

    Order matches the network's head outputs: source k, then row i (y), then column j (x), then box within
    the location. Centres are ((j + 0.5) / f_k, (i + 0.5) / f_k) with f_k = input_size / steps[k].
    Computed in float64 and rounded to float32 once. ``config.clamp_centres`` clamps all four columns to
    [0, 1] (book / amdegroot, which moves the last row and column of SSD300's 10x10 map from 1.0133 to 1.0);
    otherwise only w and h are clamped (torchvision's ``DefaultBoxGenerator(clip=True)``).
    """
    per_source: list[Tensor] = []
    for k, f in enumerate(config.feature_maps):
        f_k = config.input_size / config.steps[k]
        centres = (torch.arange(f, dtype=torch.float64) + 0.5) / f_k  # (f,)
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # (f, f): row i = y, column j = x
        wh = torch.tensor(_box_sizes(config, k), dtype=torch.float64)  # (n, 2)
        n = wh.shape[0]
        xy = torch.stack((cx, cy), dim=-1).reshape(f * f, 1, 2).expand(f * f, n, 2)  # (f*f, n, 2)
        boxes = torch.cat((xy, wh.expand(f * f, n, 2)), dim=-1)  # (f*f, n, 4)
        per_source.append(boxes.reshape(-1, 4))
    boxes = torch.cat(per_source)
    if config.clamp_centres:
        boxes = boxes.clamp(min=0.0, max=1.0)
    else:
        boxes = torch.cat((boxes[:, :2], boxes[:, 2:].clamp(min=0.0, max=1.0)), dim=1)
    return boxes.to(torch.float32)
