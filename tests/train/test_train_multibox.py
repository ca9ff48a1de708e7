"""train.multibox: matching and the SSD loss on hand-made boxes whose answers are worked out here."""

from __future__ import annotations

import math

import torch

from train.multibox import MultiBoxLoss, encode, match

# default boxes (cx, cy, w, h) and their corners, chosen so every IoU below is easy to check by hand
PRIORS = torch.tensor(
    [
        [0.25, 0.25, 0.5, 0.5],  # p0 [0, 0, .5, .5]
        [0.75, 0.75, 0.5, 0.5],  # p1 [.5, .5, 1, 1]
        [0.50, 0.50, 0.2, 0.2],  # p2 [.4, .4, .6, .6]
        [0.75, 0.25, 0.5, 0.5],  # p3 [.5, 0, 1, .5]
        [0.30, 0.30, 0.5, 0.5],  # p4 [.05, .05, .55, .55]
    ]
)
T0 = [0.0, 0.0, 0.5, 0.5]  # = p0; IoU with p4 = .2025 / .2975 = 0.681
T1 = [0.45, 0.45, 0.65, 0.65]  # best prior p2 with IoU .0225 / .0575 = 0.391 < 0.5


def test_match_forces_each_truths_best_box_and_thresholds_the_rest() -> None:
    truths = torch.tensor([T0, T1])
    labels = torch.tensor([2, 0])
    loc, conf = match(truths, labels, PRIORS, threshold=0.5)
    # p0: exact T0 -> label 2 + 1; p2: T1's best box, forced in spite of IoU 0.39 -> 0 + 1;
    # p4: IoU 0.68 with T0 -> 3; p1 (IoU .084 with T1) and p3 (.027) -> background
    assert conf.tolist() == [3, 0, 1, 0, 3]
    torch.testing.assert_close(loc[0], torch.zeros(4))
    # T1 centre (.55, .55), size .2: offsets (.05 / (0.1 * .2)) = 2.5, log(.2 / .2) / 0.2 = 0
    torch.testing.assert_close(loc[2], torch.tensor([2.5, 2.5, 0.0, 0.0]))
    # T0 against p4: (.25 - .3) / (0.1 * .5) = -1, log(.5 / .5) = 0
    torch.testing.assert_close(loc[4], torch.tensor([-1.0, -1.0, 0.0, 0.0]))


def test_match_threshold_and_a_shared_best_box() -> None:
    _, conf = match(torch.tensor([T0]), torch.tensor([1]), PRIORS, threshold=0.7)
    assert conf.tolist() == [2, 0, 0, 0, 0]  # p4's 0.681 is below 0.7 now
    # two truths whose best box is p0: the later one takes it (the book's loop order)
    near = [0.0, 0.0, 0.5, 0.45]
    _, conf = match(torch.tensor([T0, near]), torch.tensor([0, 3]), PRIORS)
    assert conf[0].item() == 4
    empty_loc, empty_conf = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), PRIORS)
    assert empty_conf.tolist() == [0] * 5 and empty_loc.shape == (5, 4)


def test_encode_inverts_models_decode() -> None:
    from models.detect import decode

    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.5, 0.55, 0.6]])
    priors = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.5, 0.6, 0.1, 0.1]])
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes)


def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_multibox_loss_hard_negatives_and_normalisation() -> None:
    # one truth T0 (label 2 -> class 3 of 4): positives p0 (exact) and p4 (IoU 0.68); p1, p2, p3 negative
    conf_logits = [
        [0.0, 0.0, 0.0, 1.0],  # p0 positive
        [0.0, 0.0, 0.0, 0.0],  # p1 negative, CE ln 4 = 1.386
        [0.0, 2.0, 0.0, 0.0],  # p2 negative, CE ln(e^2 + 3) = 2.318 (hardest)
        [3.0, 0.0, 0.0, 0.0],  # p3 negative, CE ln(e^3 + 3) - 3 = 0.138 (easiest: not mined)
        [0.0, 0.0, 0.0, 0.0],  # p4 positive
    ]
    loc_pred = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0] * 4, [50.0] * 4, [50.0] * 4, [0.0, -1.0, 0.0, 0.5]])
    criterion = MultiBoxLoss(PRIORS, threshold=0.5, neg_pos=1)  # 2 positives -> the 2 hardest negatives
    target = torch.tensor([[*T0, 2.0]])
    loss_l, loss_c = criterion(loc_pred[None], torch.tensor(conf_logits)[None], [target])
    # smooth L1 over positives only: p0 0; p4 vs (-1, -1, 0, 0): |1| -> 0.5, 0, 0, |0.5| -> 0.125
    assert math.isclose(loss_l.item(), (0.5 + 0.125) / 2, rel_tol=1e-6)
    expected_c = (
        _ce(conf_logits[0], 3) + _ce(conf_logits[4], 3) + _ce(conf_logits[2], 0) + _ce(conf_logits[1], 0)
    ) / 2
    assert math.isclose(loss_c.item(), expected_c, rel_tol=1e-6)


def test_multibox_loss_sums_over_the_batch_and_divides_by_all_positives() -> None:
    criterion = MultiBoxLoss(PRIORS, neg_pos=3)
    loc = torch.zeros(2, 5, 4)
    conf = torch.zeros(2, 5, 4)  # every CE is ln 4
    targets = [torch.tensor([[*T0, 2.0]]), torch.tensor([[*T0, 2.0], [*T1, 0.0]])]
    loss_l, loss_c = criterion(loc, conf, targets)
    # image 0: 2 positives, min(6, A - 1 = 4) = 3 negatives (all of them) -> 5 terms;
    # image 1: 3 positives (p0, p4, forced p2) + the 2 negatives -> 5 terms; N = 5 positives
    assert math.isclose(loss_c.item(), 10 * math.log(4) / 5, rel_tol=1e-6)
    # loc: zeros against the targets: image 0 p4 (-1, -1, 0, 0) -> 0.5 + 0.5;
    # image 1 the same, plus p2 (2.5, 2.5, 0, 0) -> 2 + 2
    assert math.isclose(loss_l.item(), (1.0 + 1.0 + 4.0) / 5, rel_tol=1e-6)
    # a batch without objects: no positives, no mined negatives, finite zeros
    empty_l, empty_c = criterion(loc[:1], conf[:1], [torch.zeros(0, 5)])
    assert empty_l.item() == 0.0 and empty_c.item() == 0.0
