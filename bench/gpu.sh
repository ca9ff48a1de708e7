#!/usr/bin/env bash
# The GPU benchmark of issue 4 in one command, in under 5 minutes on a fresh GPU machine.
#
#   bash bench/gpu.sh               # on the GPU machine, from anywhere in the repository
#   bash bench/gpu.sh --cpu-smoke   # on a CPU machine: the same script and stages, tiny counts
#
# Stages (each time-boxed by python -m bench; one failing does not stop the others):
#   1. the device, versions, and which serving modules are missing;
#   2. random full-size checkpoints (VGG16 torchvision layout, SSD300 ssd.pytorch layout) and JPEGs;
#   3. per model (VGG16, then SSD300): the eager model-only ceiling in fp16, bf16 and fp32 (batches 1, 64,
#      256), then the service on CUDA in fp16 (max batch 64, 8 decode threads, queue 256) driven by the
#      load generator at 32, 128 and 256 clients (one image per request) and 32 clients x 8 images,
#      then open loop at 4x the capacity it showed (overload).
# Target (issue 4): VGG16 >= 2,000 images/s through HTTP with p99 <= 100 ms, >= 0.8 of the fp16 ceiling.
#
# Needs python3 with torch, torchvision, pillow and numpy. The serving stack comes from .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Writes device.txt, bench.log, results.json and table.md (plus the plot where matplotlib exists) to
# $OUT when it is set, else to bench-results/gpu; checkpoints and JPEGs go to $BENCH_WORK (default
# bench-results/work). scikit-learn's photos are rarely on a GPU machine: carry the JPEGs that
# `python -m bench.inputs --models ''` wrote here (bench-results/work/images, under 1 MB), else a
# synthetic image stands in (inputs.json says which). Override the interpreter with PYTHON=...
set -u
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
DEST="${OUT:-bench-results/gpu}"
WORK="${BENCH_WORK:-bench-results/work}"  # checkpoints (650 MB) and JPEGs; reused when present
mkdir -p "$DEST"
START=$(date +%s)

{
  echo "== device"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not available"
  timeout 60 "$PY" - <<'EOF' || echo "python/torch check failed"
import importlib.util, os, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{os.cpu_count()} cores")
print("cuda device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
wanted = ("fastapi", "starlette", "uvicorn", "h11", "anyio", "pydantic", "pydantic_settings", "multipart",
          "prometheus_client", "PIL", "numpy", "torchvision", "matplotlib", "uvloop", "httptools")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) or "none")
EOF
} 2>&1 | tee "$DEST/device.txt"

if [ "${1:-}" = "--cpu-smoke" ]; then
  ARGS=(--device cpu --quick --models vgg16 --ours bf16 --peers none --no-openvino
        --batches 1,2 --concurrency 2,2x2 --open-factors 4 --max-batch-size 4
        --client-processes 2 --budget-s 200)
  LIMIT=230
else
  # timings from an H100 run: inputs ~12 s; per model a ceiling ~50 s, the service ~70 s
  ARGS=(--device cuda --models vgg16,ssd300 --ours fp16 --peers none --no-openvino
        --ceiling-precisions fp16,bf16,fp32 --batches 1,64,256 --ceiling-seconds 0.5
        --concurrency 32,128,256,32x8 --open-factors 4 --max-batch-size 64
        --ours-env VISION_DECODE_THREADS=8 --ours-env VISION_MAX_QUEUE_IMAGES=256 --client-processes 4
        --level-seconds 5 --warmup-max-s 2 --timeout-s 20 --ready-timeout-s 120 --budget-s 260)
  LIMIT=280
fi

echo "== python -m bench ${ARGS[*]} --out $DEST --work-dir $WORK"
timeout --kill-after=10 "$LIMIT" "$PY" -m bench "${ARGS[@]}" --out "$DEST" --work-dir "$WORK" 2>&1 | tee "$DEST/bench.log"
echo "gpu.sh: finished in $(( $(date +%s) - START )) s; results in $DEST (results.json, table.md, bench.log)"
