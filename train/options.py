"""Values that command-line options offer and library code checks: the detection metrics (and the
name each one's number is printed with) and the evaluation precisions.

Kept apart from the modules that use them (which need torch) so that ``python -m train --help``
does not import torch.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["EVALUATE_PRECISIONS", "METRICS", "METRIC_TITLES", "Metric"]

Metric = Literal["voc07", "voc12", "coco"]
METRICS: tuple[Metric, ...] = get_args(Metric)

#: What each metric's headline number is, in every message and file that prints it.
METRIC_TITLES: dict[Metric, str] = {
    "voc07": "VOC07 11-point mAP@0.5",
    "voc12": "VOC12 all-point mAP@0.5",
    "coco": "COCO AP@[.5:.95]",
}

#: ``python -m train evaluate --precision``: what the service runs on a CPU.
EVALUATE_PRECISIONS = ("fp32", "bf16", "int8")
