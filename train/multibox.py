"""SSD training targets and loss (book-ssd.md 2.9, the SSD paper's eq. 1 and 2): :func:`match`
assigns each default box a ground truth or background, :func:`encode` turns boxes into regression
targets (the inverse of ``models.detect.decode``), :class:`MultiBoxLoss` sums smooth L1 and
hard-negative-mined cross-entropy over the number of positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

__all__ = ["MultiBoxLoss", "encode", "match"]


def encode(matched: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """Regression targets: ``matched`` (Tensor[A, 4] [x1, y1, x2, y2]) against ``priors``
    (Tensor[A, 4] (cx, cy, w, h)), both normalised -> Tensor[A, 4]
    ((gcx - pcx) / (v0 pw), (gcy - pcy) / (v0 ph), log(gw / pw) / v1, log(gh / ph) / v1)."""
    centres = (matched[:, :2] + matched[:, 2:]) / 2
    sizes = matched[:, 2:] - matched[:, :2]
    offsets = (centres - priors[:, :2]) / (variances[0] * priors[:, 2:])
    scales = torch.log(sizes / priors[:, 2:]) / variances[1]
    return torch.cat((offsets, scales), dim=1)


def match(
    truths: Tensor,
    labels: Tensor,
    priors: Tensor,
    threshold: float = 0.5,
    variances: tuple[float, float] = (0.1, 0.2),
) -> tuple[Tensor, Tensor]:
    """Targets for one image: each ground truth first claims its best default box (whatever the
    IoU), then every other default box takes the ground truth it overlaps most if that IoU is >=
    ``threshold``, else background.

    Args:
        truths (Tensor[N, 4]): ground-truth boxes [x1, y1, x2, y2], normalised, with x2 > x1, y2 > y1.
        labels (LongTensor[N]): their classes, 0-based WITHOUT background.
        priors (Tensor[A, 4]): default boxes (cx, cy, w, h), normalised.

    Returns:
        loc (Tensor[A, 4]) encoded offsets to each default box's ground truth (meaningless for
        background boxes), conf (LongTensor[A]) 0 = background, else label + 1.
    """
    num_priors = priors.shape[0]
    if truths.shape[0] == 0:
        background = torch.zeros(num_priors, dtype=torch.long, device=priors.device)
        return priors.new_zeros(num_priors, 4), background
    overlaps = box_iou(truths, box_convert(priors, "cxcywh", "xyxy"))  # (N, A)
    best_prior = overlaps.argmax(dim=1)  # (N,) each ground truth's best default box
    best_truth_overlap, best_truth = overlaps.max(dim=0)  # (A,) each default box's best ground truth
    best_truth_overlap = best_truth_overlap.index_fill(0, best_prior, 2.0)  # forced matches always count
    for j in range(truths.shape[0]):  # in order, so a later truth wins a shared best box, as the book's loop
        best_truth[best_prior[j]] = j
    conf = labels[best_truth] + 1
    conf[best_truth_overlap < threshold] = 0
    return encode(truths[best_truth], priors, variances), conf


class MultiBoxLoss(nn.Module):
    """The SSD loss (paper eq. 1, section 2.2 "Hard negative mining").

    forward(loc (Tensor[B, A, 4]), conf (Tensor[B, A, C]) raw network outputs, targets: B tensors
    [n_i, 5] of [x1, y1, x2, y2, label] normalised, label 0-based without background)
    -> (loss_loc, loss_conf), each summed over the batch and divided by the number of positive
    default boxes in the batch (at least 1, so a batch without objects gives finite zeros).
    """

    def __init__(
        self,
        priors: Tensor,
        threshold: float = 0.5,
        neg_pos: int = 3,
        variances: tuple[float, float] = (0.1, 0.2),
    ) -> None:
        super().__init__()
        self.register_buffer("priors", priors.clone(), persistent=False)
        self.threshold = threshold
        self.neg_pos = neg_pos
        self.variances = variances

    def targets(self, targets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Matched (loc_t (Tensor[B, A, 4]), conf_t (LongTensor[B, A])) for a batch of targets."""
        priors = self.get_buffer("priors")
        locs, confs = [], []
        for target in targets:
            target = target.to(priors.device, torch.float32)
            loc, conf = match(target[:, :4], target[:, 4].long(), priors, self.threshold, self.variances)
            locs.append(loc)
            confs.append(conf)
        return torch.stack(locs), torch.stack(confs)

    def forward(self, loc: Tensor, conf: Tensor, targets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        batch, num_priors, num_classes = conf.shape
        with torch.no_grad():
            loc_t, conf_t = self.targets(targets)
        pos = conf_t > 0  # (B, A)
        num_pos = pos.sum(dim=1, keepdim=True)  # (B, 1)
        loss_loc = F.smooth_l1_loss(loc[pos].float(), loc_t[pos], reduction="sum")

        with torch.no_grad():  # hard negative mining: rank the negatives by their own cross-entropy
            mining = F.cross_entropy(
                conf.reshape(-1, num_classes).float(), conf_t.reshape(-1), reduction="none"
            ).reshape(batch, num_priors)
            mining[pos] = 0.0
            order = mining.argsort(dim=1, descending=True)
            rank = order.argsort(dim=1)  # rank[b, a] = position of box a in the descending order
            num_neg = torch.clamp(self.neg_pos * num_pos, max=num_priors - 1)
            neg = rank < num_neg  # (B, A)
        chosen = pos | neg
        loss_conf = F.cross_entropy(conf[chosen].float(), conf_t[chosen], reduction="sum")
        n = num_pos.sum().clamp(min=1).to(loss_loc.dtype)
        return loss_loc / n, loss_conf / n
