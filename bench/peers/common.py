"""What both peers share: command-line arguments, loading the model, and JSON encoding of outputs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models import Classifier, ClassifyOutput, Detector, DetectOutput, DetectParams

#: top-k of the classifier's answer (api.md's default).
TOP_K = 5
#: Detection parameters (api.md's defaults: score 0.5, the model's IoU, 100 boxes).
DETECT_PARAMS = DetectParams()


def parse_args(prog: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--work-dir", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--model", required=True, help="benchmark model name (vgg16, ssd300)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=8, help="LitServe only")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="LitServe only, seconds")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Classifier | Detector:
    """The benchmark model, loaded by ``models.load_model`` as the service loads it."""
    from bench.ceiling import bench_spec
    from models import load_model

    return load_model(bench_spec(args.work_dir, args.model), device=args.device, precision=args.precision)


def encode(
    predictor: Classifier | Detector, index: int, size: tuple[int, int], output: ClassifyOutput | DetectOutput
) -> dict[str, Any]:
    """One result in api.md's shape (``predictions`` or ``detections``)."""
    labels = predictor.info.labels
    result: dict[str, Any] = {"index": index, "image": {"width": size[0], "height": size[1]}}
    if isinstance(output, ClassifyOutput):
        result["predictions"] = [
            {"label": labels[c], "class_id": c, "score": s}
            for c, s in zip(output.class_ids.tolist(), output.scores.tolist(), strict=True)
        ]
    else:
        result["detections"] = [
            {
                "label": labels[c],
                "class_id": c,
                "score": s,
                "box": {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]},
            }
            for c, s, b in zip(
                output.class_ids.tolist(), output.scores.tolist(), output.boxes.tolist(), strict=True
            )
        ]
    return result


def predict_batch(
    predictor: Classifier | Detector, batch: Any, sizes: Sequence[tuple[int, int]]
) -> list[ClassifyOutput] | list[DetectOutput]:
    """One forward pass over ``batch`` (FloatTensor[B, 3, H, W]) with the default parameters."""
    if isinstance(predictor, Classifier):
        return predictor.predict(batch, top_k=TOP_K)
    return predictor.predict(batch, image_sizes=list(sizes), params=[DETECT_PARAMS] * len(sizes))
