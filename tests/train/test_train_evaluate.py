"""train.evaluate.DetectionMAP on hand-made detections whose AP is worked out here.

COCO's AP: precision made monotone (each point takes the best precision at any higher recall),
then read at the 101 recall levels 0, 0.01, .., 1 (the first detection reaching each level) and
averaged; AP@[.5:.95] averages that over IoU thresholds 0.50, 0.55, .., 0.95 (a match needs
IoU >= the threshold).
"""

from __future__ import annotations

import pytest
import torch

from train.evaluate import DetectionMAP

T = torch.tensor


def test_known_average_precisions() -> None:
    metric = DetectionMAP()
    # image A, class 0: two objects; detections TP (0.9), FP (0.8, nowhere), TP (0.7), exact boxes
    # -> recall 1/2, 1/2, 1 with precision 1, 1/2, 2/3; monotone precision 1 up to recall 0.5,
    # 2/3 beyond: 51 levels (0 .. 0.50) at 1 and 50 levels (0.51 .. 1) at 2/3; every IoU is 1.
    # class 1: one object [0, 0, 10, 10], one detection [0, 0, 10, 6.2]: IoU 0.62, a match at the
    # thresholds 0.50, 0.55, 0.60 only -> AP50 1, AP@[.5:.95] 3/10.
    # class 2: a detection but no object anywhere: COCO leaves the class out of the means.
    metric.add(
        boxes=T([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30], [0, 0, 10, 6.2], [70, 70, 80, 80]]),
        scores=T([0.9, 0.8, 0.7, 0.6, 0.5]),
        class_ids=T([0, 0, 0, 1, 2]),
        truth_boxes=T([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]]),
        truth_ids=T([0, 0, 1]),
    )
    result = metric.compute()
    ap0 = (51 * 1.0 + 50 * 2 / 3) / 101
    assert result["per_class"]["0"]["ap_50"] == pytest.approx(ap0, abs=1e-6)
    assert result["per_class"]["0"]["ap"] == pytest.approx(ap0, abs=1e-6)
    assert result["per_class"]["1"]["ap_50"] == pytest.approx(1.0)
    assert result["per_class"]["1"]["ap"] == pytest.approx(0.3, abs=1e-6)
    assert result["map_50"] == pytest.approx((ap0 + 1.0) / 2, abs=1e-6)
    assert result["map"] == pytest.approx((ap0 + 0.3) / 2, abs=1e-6)
    assert metric.images == 1


def test_missed_objects_in_other_images_lower_recall() -> None:
    metric = DetectionMAP()
    metric.add(T([[0, 0, 10, 10]]), T([0.9]), T([0]), T([[0, 0, 10, 10]]), T([0]))
    metric.add(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
               T([[5, 5, 25, 25]]), T([0]))
    # one of two objects found, precision 1: levels 0 .. 0.50 at 1, the rest 0 -> 51 / 101
    assert metric.compute()["map_50"] == pytest.approx(51 / 101, abs=1e-6)


def test_a_detection_of_the_wrong_class_does_not_count() -> None:
    metric = DetectionMAP()
    metric.add(T([[0, 0, 10, 10]]), T([0.9]), T([1]), T([[0, 0, 10, 10]]), T([0]))
    result = metric.compute()
    assert result["per_class"]["0"]["ap_50"] == 0.0 and result["map_50"] == 0.0
