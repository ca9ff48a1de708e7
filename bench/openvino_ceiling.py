"""OpenVINO runtime's model-only throughput on the same network: what a CPU user would pick instead.

The network built by ``models`` from the benchmark checkpoint is converted by
:func:`models.openvino_runtime.convert_network` (the service's own conversion); for int8 it is
quantized by NNCF (:func:`models.openvino_runtime.quantize_network`), calibrated on the same
calibration images, through the same preprocessing, as this project's FX int8. Each precision is
reshaped to each batch size, compiled for the CPU with ``PERFORMANCE_HINT=THROUGHPUT`` (OpenVINO
picks the streams) and an explicit inference precision (f32 for fp32 and for what int8 leaves in
float; the CPU plugin would otherwise pick bf16 on CPUs with bf16 instructions), and fed random
fp32 tensors through an ``AsyncInferQueue`` of the compiled model's optimal number of requests.
Like :mod:`bench.ceiling`, nothing but the network is timed.

``python -m bench.openvino_ceiling --work-dir DIR --model vgg16 --precisions int8,bf16,fp32 --json out.json``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ceiling import bench_spec, machine_info, write_json

#: our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values (int8: for the ops left in float)
OV_PRECISIONS = {"int8": "f32", "bf16": "bf16", "fp32": "f32", "fp16": "f16"}


def measure(
    ov_model: Any,
    input_size: tuple[int, int],
    precision: str,
    batches: Sequence[int],
    min_seconds: float,
    threads: int | None,
) -> dict[str, Any]:
    """Images/s of the converted model (``ov_model``, left unchanged) at each batch size (throughput
    hint, async queue)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    rows: list[dict[str, Any]] = []
    for b in batches:
        model = ov_model.clone()  # the caller's model keeps its dynamic batch (NNCF feeds it one image)
        model.reshape([b, 3, *input_size])
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        t_compile = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        compile_s = time.perf_counter() - t_compile
        nireq = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        streams = compiled.get_property("NUM_STREAMS")
        queue = ov.AsyncInferQueue(compiled, nireq)
        data = np.random.default_rng(0).standard_normal((b, 3, *input_size), dtype=np.float32)
        for _ in range(nireq):  # warm-up: every request once
            queue.start_async({0: data})
        queue.wait_all()
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < min_seconds or n < 2 * nireq:
            queue.start_async({0: data})  # blocks while every request is busy
            n += 1
        queue.wait_all()
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "batch": b,
                "images_per_s": round(n * b / seconds, 3),
                "requests": nireq,
                "streams": int(streams),
                "compile_s": round(compile_s, 2),
                "iters": n,
            }
        )
        print(
            f"  openvino {precision} batch {b:3d}: {rows[-1]['images_per_s']:10.2f} images/s "
            f"({nireq} requests, {streams} streams)",
            flush=True,
        )
        del queue, compiled, model
    best = max(rows, key=lambda r: r["images_per_s"]) if rows else None
    return {"precision": precision, "by_batch": rows, "best": best}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openvino_ceiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--work-dir", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--precisions", default="int8,bf16,fp32", help="of int8, bf16, fp32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--threads", type=int, default=None, help="INFERENCE_NUM_THREADS (default: OpenVINO's)"
    )
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import openvino as ov

    from models import load_model
    from models.openvino_runtime import convert_network, quantize_network
    from models.preprocess import calibration_batches
    from models.quantize import load_calibration_images

    predictor = load_model(bench_spec(args.work_dir, args.model))  # fp32, as the converter wants
    input_size = predictor.info.input_size
    t0 = time.perf_counter()
    fp32_model = convert_network(predictor.model, input_size)
    convert_s = time.perf_counter() - t0
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    results = []
    for precision in precisions:
        ov_model, extra = fp32_model, {}
        if precision == "int8":  # NNCF on this project's calibration images, its own preprocessing
            images = load_calibration_images(args.work_dir / "calibration")
            t0 = time.perf_counter()
            ov_model = quantize_network(fp32_model, calibration_batches(images, predictor.preprocess))
            extra = {"calibration_images": len(images), "quantize_s": round(time.perf_counter() - t0, 2)}
            print(f"  openvino int8: NNCF calibrated on {len(images)} calibration/ images", flush=True)
        results.append(
            {**measure(ov_model, input_size, precision, batches, args.min_seconds, args.threads), **extra}
        )
    doc = {
        "model": args.model,
        "input_size": list(input_size),
        "openvino": ov.__version__,
        "nncf": _nncf_version() if "int8" in precisions else None,
        "convert_s": round(convert_s, 2),
        "threads": args.threads or os.cpu_count(),
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.json, doc)
    return 0


def _nncf_version() -> str:
    import nncf

    return str(nncf.__version__)


if __name__ == "__main__":
    sys.exit(main())
