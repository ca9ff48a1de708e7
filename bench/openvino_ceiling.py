"""OpenVINO runtime's model-only throughput on the same network: what a CPU user would pick instead.

The network built by ``models`` from the benchmark checkpoint is converted with
``openvino.convert_model`` (fp32 example input), reshaped to each batch size, compiled for the CPU
with ``PERFORMANCE_HINT=THROUGHPUT`` (OpenVINO picks the streams) and an inference precision hint
(bf16 by default), and fed random fp32 tensors through an ``AsyncInferQueue`` of the compiled
model's optimal number of requests. Like :mod:`bench.ceiling`, nothing but the network is timed.

``python -m bench.openvino_ceiling --work-dir DIR --model vgg16 --json out.json``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ceiling import load_network, machine_info, write_json

#: our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
OV_PRECISIONS = {"bf16": "bf16", "fp32": "f32", "fp16": "f16"}


def measure(
    ov_model: Any,
    input_size: tuple[int, int],
    precision: str,
    batches: Sequence[int],
    min_seconds: float,
    threads: int | None,
) -> dict[str, Any]:
    """Images/s of the converted model at each batch size (throughput hint, async queue)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    rows: list[dict[str, Any]] = []
    for b in batches:
        ov_model.reshape([b, 3, *input_size])
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        t_compile = time.perf_counter()
        compiled = core.compile_model(ov_model, "CPU", config)
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
        del queue, compiled
    best = max(rows, key=lambda r: r["images_per_s"]) if rows else None
    return {"precision": precision, "by_batch": rows, "best": best}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openvino_ceiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--work-dir", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--threads", type=int, default=None, help="INFERENCE_NUM_THREADS (default: OpenVINO's)"
    )
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import openvino as ov
    import torch

    network, input_size = load_network(args.work_dir, args.model)  # fp32, as the converter wants
    t0 = time.perf_counter()
    with torch.inference_mode():
        ov_model = ov.convert_model(network, example_input=torch.randn(1, 3, *input_size))
    convert_s = time.perf_counter() - t0
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    results = [
        measure(ov_model, input_size, p.strip(), batches, args.min_seconds, args.threads)
        for p in args.precisions.split(",")
        if p.strip()
    ]
    doc = {
        "model": args.model,
        "input_size": list(input_size),
        "openvino": ov.__version__,
        "convert_s": round(convert_s, 2),
        "threads": args.threads or os.cpu_count(),
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
