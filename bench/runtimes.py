"""Four runtimes for one served network, side by side in one process: torch eager fp32, OpenVINO fp32,
this project's torch FX int8 and OpenVINO int8 (NNCF), model only, with their fidelity.

Each runtime is what the service would run (:mod:`models.quantize` for FX int8,
:mod:`models.openvino_runtime` for OpenVINO, both calibrated on the bench's calibration images
through the model's own preprocessing) and is called the way the service calls it: one synchronous
batch at a time. Timing is interleaved call by call (one call of each runtime per round), and both
the median images/s and the median over rounds of each runtime's ratio to torch fp32 are reported,
so that load from other processes falls on all four alike. Fidelity is measured on the calibration
images (in-sample) with :func:`models.agreement.agreement_report` against torch fp32, plus the share
of fp32's detections that the candidate finds again at IoU >= 0.9.

``python -m bench.runtimes --work-dir bench-results/work --models vgg16,ssd300 --json out.json``
(the checkpoints and calibration images come from ``python -m bench.inputs``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ceiling import bench_spec, machine_info, write_json

#: The runtimes, in the order they are timed within a round.
RUNTIMES: tuple[str, ...] = ("torch fp32", "openvino fp32", "torch FX int8", "openvino int8")


def build_runtimes(work_dir: Path, model: str, threads: int | None) -> tuple[dict[str, Any], list[Any]]:
    """``model``'s predictor once per runtime ({name: predictor}) and the calibration images."""
    from models import load_model
    from models.openvino_runtime import use_openvino
    from models.quantize import load_calibration_images, quantize_predictor

    spec = bench_spec(work_dir, model)
    images = load_calibration_images(work_dir / "calibration")
    predictors: dict[str, Any] = {}
    for name in RUNTIMES:
        t0 = time.perf_counter()
        predictor = load_model(spec)
        if name == "openvino fp32":
            use_openvino(predictor, "fp32", threads=threads)
        elif name == "torch FX int8":
            quantize_predictor(predictor, images)
        elif name == "openvino int8":
            use_openvino(predictor, "int8", images, threads=threads)
        predictors[name] = predictor
        print(f"  {model} {name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return predictors, images


def fidelity(predictors: dict[str, Any], images: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Each non-reference runtime against torch fp32 on ``images``: agreement_report's figures (for
    detectors with ``high_iou_recall``, the share found again at IoU >= 0.9)."""
    from models.agreement import agreement_report, reference_outputs

    reference = reference_outputs(predictors[RUNTIMES[0]], images)
    out: dict[str, dict[str, Any]] = {}
    for name in RUNTIMES[1:]:
        candidate = reference_outputs(predictors[name], images)
        out[name] = agreement_report(reference, candidate)
    return out


def time_interleaved(predictors: dict[str, Any], batch: int, calls: int) -> dict[str, list[float]]:
    """images/s of each call of each runtime's network on one random batch of ``batch``: after a
    warm-up call each, ``calls`` rounds of one call per runtime in turn, so that load from other
    processes falls on all of them alike."""
    import torch

    first = next(iter(predictors.values()))
    x = torch.randn(batch, 3, *first.info.input_size).contiguous(memory_format=torch.channels_last)
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    with torch.inference_mode():
        for predictor in predictors.values():
            predictor.model(x)
        for r in range(calls):
            for name, predictor in predictors.items():
                t0 = time.perf_counter()
                predictor.model(x)
                rates[name].append(round(batch / (time.perf_counter() - t0), 3))
            print(f"  call {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in rates.items()), flush=True)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--models", default="vgg16,ssd300")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=12, help="timed calls per runtime, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    doc: dict[str, Any] = {"batch": args.batch, "calls": args.calls}
    doc.update(threads=threads, machine=machine_info(), models={})
    for model in filter(None, (m.strip() for m in args.models.split(","))):
        predictors, images = build_runtimes(args.work_dir, model, args.threads)
        rates = time_interleaved(predictors, args.batch, args.calls)
        medians = {name: statistics.median(v) for name, v in rates.items()}
        # per round, each runtime against torch fp32 timed next to it: steadier than the medians alone
        ratios = {n: round(statistics.median(a / b for a, b in zip(v, rates[RUNTIMES[0]], strict=True)), 3)
                  for n, v in rates.items()}  # fmt: skip
        doc["models"][model] = {
            "images_per_s": rates,
            "median_images_per_s": medians,
            "vs_torch_fp32_median_of_rounds": ratios,
            "fidelity_vs_torch_fp32": fidelity(predictors, images),
            "fidelity_images": len(images),
        }
        for name in RUNTIMES:
            print(f"  {model} {name}: {medians[name]:.2f} images/s (median)", flush=True)
        del predictors
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
