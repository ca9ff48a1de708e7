#!/usr/bin/env bash
# The GPU benchmark of issue 4 in one command, in under 5 minutes on a fresh GPU machine.
#
#   bash bench/gpu.sh               # on the GPU machine, from anywhere in the repository
#   bash bench/gpu.sh --cpu-smoke   # on a CPU machine: the same script and stages, tiny counts
#
# Stages (each time-boxed by python -m bench; one failing does not stop the others):
#   1. the device, versions, and which serving modules are missing;
#   2. random full-size checkpoints (VGG16 torchvision layout, SSD300 ssd.pytorch layout) and JPEGs;
#   3. VGG16: the eager model-only ceiling in fp16 and fp32 (batches 64, 256), then the service on CUDA
#      in fp16 (max batch 64, JPEGs decoded on the GPU: VISION_JPEG_DECODE=auto) with 1 worker and with
#      4 workers (VISION_WORKERS), each driven by the load generator at 64 and 256 clients (one image per
#      request) and 32 clients x 8 images, then open loop at 4x the capacity it showed (overload);
#   4. SSD300: the fp16 ceiling and the service with 4 workers, the same levels.
# Target (issue 4): VGG16 >= 2,000 images/s through HTTP with p99 <= 100 ms, >= 0.8 of the fp16 ceiling.
#
# Needs python3 with torch, torchvision, pillow and numpy. The serving stack comes from .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Writes device.txt, bench.log, results.json and table.md (plus the plot where matplotlib exists) to
# $OUT when it is set, else to bench-results/gpu (SSD300's in its ssd300/ folder); checkpoints and JPEGs go to $BENCH_WORK (default
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
  # from the H100 run of the last session: inputs ~12 s, a ceiling ~30 s, a service start ~20 s
  COMMON=(--device cuda --ours fp16 --peers none --no-openvino --ceiling-seconds 0.5
          --concurrency 64,256,32x8 --open-factors 4 --max-batch-size 64
          --ours-env VISION_MAX_QUEUE_IMAGES=512 --client-processes 4
          --level-seconds 4 --warmup-max-s 2 --timeout-s 20 --ready-timeout-s 120)
  ARGS=("${COMMON[@]}" --models vgg16 --ceiling-precisions fp16,fp32 --batches 64,256
        --ours-workers 1,4 --budget-s 170)
  ARGS2=("${COMMON[@]}" --models ssd300 --ceiling-precisions fp16 --batches 64,256
         --ours-workers 4 --budget-s 95)
  LIMIT=185
  LIMIT2=105
fi

echo "== python -m bench ${ARGS[*]} --out $DEST --work-dir $WORK"
timeout --kill-after=10 "$LIMIT" "$PY" -m bench "${ARGS[@]}" --out "$DEST" --work-dir "$WORK" 2>&1 | tee "$DEST/bench.log"
if [ -n "${ARGS2+x}" ]; then
  echo "== python -m bench ${ARGS2[*]} --out $DEST/ssd300 --work-dir $WORK"
  timeout --kill-after=10 "$LIMIT2" "$PY" -m bench "${ARGS2[@]}" --out "$DEST/ssd300" --work-dir "$WORK" 2>&1 \
    | tee "$DEST/bench-ssd300.log"
fi
echo "gpu.sh: finished in $(( $(date +%s) - START )) s; results in $DEST (results.json, table.md, bench.log)"
