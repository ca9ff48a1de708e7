"""The model-only ceiling: the same network in an eager PyTorch loop over preprocessed tensors.

What a careful engineer gets without a server: the checkpoint built by ``models`` (the very code
the service runs), cast to the precision (bf16/fp16 weights and inputs, no autocast), channels_last,
``torch.inference_mode``, ``cudnn.benchmark`` on CUDA, the same thread count as the service, and a
sweep of batch sizes of which the best counts. Inputs are random tensors of the network's input
size: decode, preprocessing and post-processing are not included (the service must pay for those
and still reach the ratio). Run it in a process of its own, with the allocator settings
(:data:`ALLOCATOR_ENV`) in its environment: glibc reads them at start.

It also puts the loop against the hardware: the network's arithmetic per image (counted once with
``torch.utils.flop_counter``, 2 FLOPs per multiply-add) times the best images/s, as a fraction of
what one large square matmul reaches at the same precision on the same device and threads. A loop
near 1.0 of that peak leaves nothing for a server to win at the same arithmetic: beating it by
1.3x then takes fewer or cheaper operations (int8), not a better loop.

``python -m bench.ceiling --work-dir DIR --model vgg16 --precisions bf16,fp32 --json out.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

#: glibc malloc settings that keep freed memory in the process (no mmap/munmap and page faults per
#: batch for the large activations): issue 4 measured 1.2x-2.7x from these on this machine.
#: 16 GiB: trimming never triggers in practice.
ALLOCATOR_ENV: dict[str, str] = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}

#: Batch sizes tried by default on each device.
CPU_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
GPU_BATCHES: tuple[int, ...] = (1, 8, 32, 64, 128, 256)

#: Side of the square matmul that gives the arithmetic peak per device (large enough to be compute
#: bound, small enough to time in about a second on two CPU cores).
PEAK_MATMUL_N = {"cpu": 2048, "cuda": 8192}

#: Input dtype per precision: int8 networks take float32 and quantize inside (models.quantize).
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "float32"}


#: CPU flags that decide which runtime and precision is fastest (AVX2 only, AVX-512 with VNNI / BF16,
#: AMX tiles): the machine line of every report names those present.
ISA_FLAGS: tuple[str, ...] = (
    "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip


def machine_info() -> dict[str, Any]:
    """CPU model and the :data:`ISA_FLAGS` it has, core count, Python and (when imported) torch
    version, GPU name."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = [flag for flag in ISA_FLAGS if flag in flags]
                break
    except OSError:
        pass
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def time_forward(
    forward: Callable[[], object],
    sync: Callable[[], None],
    min_seconds: float,
    min_iters: int,
    warmup_iters: int = 2,
) -> tuple[int, float]:
    """Run ``forward`` ``warmup_iters`` times, then until both ``min_iters`` calls and
    ``min_seconds`` have passed: (timed calls, seconds)."""
    for _ in range(warmup_iters):
        forward()
    sync()
    n = 0
    t0 = time.perf_counter()
    while True:
        forward()
        n += 1
        if n >= min_iters:
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return n, elapsed


def matmul_peak_gflops(device: str, precision: str, min_seconds: float = 1.0) -> float | None:
    """GFLOP/s of a large square matmul at ``precision`` on ``device`` (None for int8: its
    quantized convolutions have no matmul of the same kind to compare with)."""
    import torch

    if precision not in ("fp32", "bf16", "fp16"):
        return None
    dtype = getattr(torch, DTYPES[precision])
    n = PEAK_MATMUL_N["cuda" if device.startswith("cuda") else "cpu"]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        calls, seconds = time_forward(lambda: a @ b, sync, min_seconds, min_iters=3)
    return round(2 * n**3 * calls / seconds / 1e9, 1)


def gflop_per_image(net: Any, input_size: tuple[int, int], device: str, precision: str) -> float | None:
    """The network's arithmetic for one image, in GFLOP (2 per multiply-add, as counted by
    ``torch.utils.flop_counter``); None where the counter does not see it (quantized int8 ops)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = getattr(torch, DTYPES[precision])
    x = torch.randn(1, 3, *input_size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    total = counter.get_total_flops()
    return total / 1e9 if total else None


def measure(
    net: Any,
    input_size: tuple[int, int],
    device: str,
    precision: str,
    batches: Sequence[int],
    min_seconds: float,
    min_iters: int,
    gflop: float | None = None,
) -> dict[str, Any]:
    """Images/s of ``net`` (already on ``device`` in ``precision``) at each batch size; ``best`` is
    the fastest. With ``gflop`` (per image), also the best's GFLOP/s against the matmul peak."""
    import torch

    dtype = getattr(torch, DTYPES[precision])
    cuda = device.startswith("cuda")
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    rows: list[dict[str, Any]] = []
    error = None
    for b in batches:
        x = (
            torch.randn(b, 3, *input_size, device=device)
            .to(dtype)
            .contiguous(memory_format=torch.channels_last)
        )

        def forward(x: torch.Tensor = x) -> object:
            return net(x)

        try:
            with torch.inference_mode():
                n, seconds = time_forward(forward, sync, min_seconds, min_iters)
        except torch.cuda.OutOfMemoryError as e:  # the largest batches may not fit: keep the rest
            error = f"batch {b}: out of memory ({str(e).splitlines()[0]})"
            torch.cuda.empty_cache()
            break
        rows.append(
            {
                "batch": b,
                "images_per_s": round(n * b / seconds, 3),
                "ms_per_batch": round(1000 * seconds / n, 3),
                "iters": n,
            }
        )
        print(
            f"  {precision} batch {b:4d}: {rows[-1]['images_per_s']:10.2f} images/s "
            f"({rows[-1]['ms_per_batch']:.1f} ms/batch)",
            flush=True,
        )
    best = max(rows, key=lambda r: r["images_per_s"]) if rows else None
    peak = matmul_peak_gflops(device, precision) if gflop is not None else None  # a second of matmuls
    arithmetic = None
    if best is not None and gflop is not None and peak:
        achieved = best["images_per_s"] * gflop
        arithmetic = {"gflops": round(achieved, 1), "peak_fraction": round(achieved / peak, 3)}
        print(
            f"  {precision}: {achieved:.0f} GFLOP/s at batch {best['batch']}, {achieved / peak:.2f} of a "
            f"{PEAK_MATMUL_N['cuda' if device.startswith('cuda') else 'cpu']}^2 matmul ({peak:.0f} GFLOP/s)",
            flush=True,
        )
    return {
        "precision": precision,
        "device": device,
        "channels_last": True,
        "by_batch": rows,
        "best": best,
        "matmul_peak_gflops": peak,
        "arithmetic": arithmetic,
        "error": error,
    }


def bench_spec(work_dir: Path, name: str) -> Any:
    """The ``models.ModelSpec`` of benchmark model ``name`` (checkpoint under ``work_dir``)."""
    from bench.inputs import bench_model
    from models import ModelSpec, Task

    m = bench_model(name, work_dir)
    task = cast(Task, m.task)
    return ModelSpec(name=m.name, task=task, arch=m.arch, format=m.format, weights=m.weights, labels=m.labels)


def load_network(
    work_dir: Path, name: str, device: str = "cpu", precision: str = "fp32"
) -> tuple[Any, tuple[int, int]]:
    """Benchmark model ``name`` loaded by ``models.load_model`` exactly as the service loads it (on
    ``device``, weights in ``precision``, channels_last, eval): (its network, (H, W) input size)."""
    from models import Precision, load_model

    float_precision = "fp32" if precision == "int8" else precision
    spec = bench_spec(work_dir, name)
    predictor = load_model(spec, device=device, precision=cast(Precision, float_precision))
    if precision == "int8":  # as VISION_PRECISION=int8 does: FX static PTQ calibrated on images
        from models.quantize import load_calibration_images, quantize_predictor

        quantize_predictor(predictor, load_calibration_images(work_dir / "calibration"))
    return predictor.model, predictor.info.input_size


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--model", required=True, help="benchmark model name (vgg16, ssd300)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", type=_csv, default=["bf16", "fp32"])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in _csv(s)], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each float network (inductor, weights frozen) before timing it: the "
        "step past eager that the report does not take (it gave 1.03x in bf16 on the 2-core CPU)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    batches = args.batches or list(GPU_BATCHES if args.device.startswith("cuda") else CPU_BATCHES)
    results = []
    input_size: tuple[int, int] = (0, 0)
    gflop: float | None = None  # counted on the first float network: int8 does the same operations
    for precision in args.precisions:
        if precision == "fp16" and not args.device.startswith("cuda"):
            print("  fp16 skipped on the CPU (no fast fp16 kernels)", flush=True)
            continue
        if precision == "int8" and args.device.startswith("cuda"):
            print("  int8 skipped on CUDA (the quantized kernels are the CPU's)", flush=True)
            continue
        network, input_size = load_network(args.work_dir, args.model, args.device, precision)
        if precision == "int8":
            print("  int8: calibrated on bench inputs' calibration/ images", flush=True)
        elif gflop is None:
            gflop = gflop_per_image(network, input_size, args.device, precision)
        if args.compile and precision != "int8":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant weights: prepacked, folded into the kernels
            network = torch.compile(network)
        results.append(
            measure(
                network, input_size, args.device, precision, batches, args.min_seconds, args.min_iters, gflop
            )
        )
        del network
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    doc = {
        "model": args.model,
        "input_size": list(input_size),
        "gflop_per_image": gflop,
        "compiled": args.compile,
        "threads": threads,
        "allocator_env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ},
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.json, doc)
    return 0


def write_json(path: Path | None, doc: Mapping[str, Any]) -> None:
    """Write a stage's result document to ``path`` (the ``--json`` option), if given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    sys.exit(main())
