#!/usr/bin/env bash
# Issue 16's GPU run in one command, in at most 8 minutes on one H100/H200-class GPU.
#
#   .venv/bin/python -m bench.gpu_wheels   # here, before: the web stack's wheels into .whl/ (~6 MB)
#   bash bench/gpu.sh                      # on the GPU machine (carry .whl), from the repository root
#   bash bench/gpu.sh --cpu-smoke          # on a CPU machine (.venv's python): every stage, tiny counts
#
# Stages (each time-boxed; one failing does not stop the others), into <out>/run/:
#   1. the device, driver and versions (device.txt);
#   2. at once: the CUDA tests (pytest -m "gpu or cuda": pytest-gpu.xml and .log) and the
#      correctness check (python -m bench.device_check: the book's VGG16, torchvision's VGG16 and
#      the book's SSD300, saved from cuda:0, on CUDA fp32 against CPU fp32, fp16 / bf16 against fp32);
#   3. VGG16 (python -m bench, vgg16/): the eager fp16 ceiling at batch 1..256 and fp32 at 64, then
#      the service at fp16 (max batch 64) with 4 and 1 workers, each with JPEGs decoded on the GPU
#      and on the CPU (VISION_JPEG_DECODE=device / cpu), at 64 and 256 clients with one 500x375
#      JPEG per request and 32 clients with eight, then open loop at 4x the capacity it showed;
#      GPU memory per worker from /metrics and nvidia-smi;
#   4. SSD300 (ssd300/): the same;
#   5. python -m bench.gpu_report: gpu-<device>-<date>.md and .json (commit them under docs/bench/).
# Targets (issue 16): VGG16 >= 2,000 images/s through HTTP at p99 <= 100 ms and >= 0.5 of the fp16
# loop at the service's batch; SSD300 >= 1,000 images/s at p99 <= 150 ms; overload only 503s.
#
# The machine's python3 has torch and torchvision; .whl/ (when carried) is installed into
# /tmp/site first. <out> is $OUT when it is set (the device tool's folder, which brings back at
# most 8 files), else bench-results/gpu: it gets gpu.log (this output), the report, and
# all.tar.gz (run/ packed; run/ itself is removed under $OUT).
# Checkpoints (~650 MB) and JPEGs go to $BENCH_WORK (default bench-results/work). Interpreter:
# PYTHON=... The commit measured: COMMIT=... (else git's, where .git is there).
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PY="${PYTHON:-python3}"
[ "$SMOKE" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
TOP="${OUT:-bench-results/gpu}"  # the report, gpu.log and all.tar.gz
DEST="$TOP/run"                   # everything else; packed into all.tar.gz, removed there under $OUT
WORK="${BENCH_WORK:-bench-results/work}"
rm -rf "$DEST"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
exec > >(tee "$TOP/gpu.log") 2>&1
TEE=$!

if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then  # the smoke test uses the venv as it is
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu.sh: installing .whl/ failed" >&2
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

{
  echo "== device (commit $COMMIT)"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not available"
  timeout 60 "$PY" - <<'EOF' || echo "python/torch check failed"
import importlib.util, os, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{os.cpu_count()} cores")
print("cuda device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
wanted = ("fastapi", "starlette", "uvicorn", "h11", "anyio", "pydantic", "pydantic_settings", "multipart",
          "prometheus_client", "PIL", "numpy", "torchvision", "httpx", "pytest", "pytest_asyncio",
          "sklearn", "matplotlib", "uvloop", "httptools")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) or "none")
EOF
} 2>&1 | tee "$DEST/device.txt"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  CHECK=(--device cpu --width 0.25 --images 4 --precisions bf16)
  COMMON=(--device cpu --quick --ours fp32 --peers none --no-openvino --ceiling-precisions fp32
          --batches 1,2 --concurrency 2,2x2 --open-factors 4 --max-batch-size 4
          --ours-workers 2,1 --ours-decodes device,cpu --client-processes 2
          --level-seconds 2 --warmup-max-s 1)
  VGG=("${COMMON[@]}" --models vgg16 --budget-s 170)
  SSD=("${COMMON[@]}" --models ssd300 --ours-workers 2 --budget-s 110)
  TESTS_LIMIT=150 VGG_LIMIT=190 SSD_LIMIT=130
else
  DEVICE=cuda
  CHECK=(--device cuda --precisions fp16,bf16)
  # measured on an H100 (an earlier run): inputs ~12 s, a ceiling ~30 s, a service start ~20 s
  COMMON=(--device cuda --ours fp16 --peers none --no-openvino --ceiling-seconds 0.3
          --concurrency 64,256,32x8 --open-factors 4 --max-batch-size 64
          --ours-workers 4,1 --ours-decodes device,cpu
          --ours-env VISION_MAX_QUEUE_IMAGES=512 --client-processes 6
          --level-seconds 3 --warmup-max-s 1.5 --timeout-s 20 --ready-timeout-s 90)
  VGG=("${COMMON[@]}" --models vgg16 --ceiling-precisions fp16,fp32 --batches 1,8,32,64,128,256 --budget-s 170)
  SSD=("${COMMON[@]}" --models ssd300 --ceiling-precisions fp16 --batches 1,8,32,64,128,256 --budget-s 150)
  TESTS_LIMIT=110 VGG_LIMIT=185 SSD_LIMIT=165
fi

echo "== stage 2: CUDA tests and device check (at once, ${TESTS_LIMIT} s at most)"
timeout --kill-after=10 "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -m "gpu or cuda" \
  --junitxml="$DEST/pytest-gpu.xml" tests/app tests/models >"$DEST/pytest-gpu.log" 2>&1 &
TESTS=$!
timeout --kill-after=10 "$TESTS_LIMIT" "$PY" -m bench.device_check "${CHECK[@]}" \
  --work-dir "$WORK/device-check" --json "$DEST/device-check.json" >"$DEST/device-check.log" 2>&1
echo "device_check: exit $? ($DEVICE); $(tail -n 1 "$DEST/device-check.log")"
wait "$TESTS"
echo "pytest: exit $?; $(tail -n 1 "$DEST/pytest-gpu.log")"

echo "== stage 3: python -m bench ${VGG[*]}"
timeout --kill-after=10 "$VGG_LIMIT" "$PY" -m bench "${VGG[@]}" --out "$DEST/vgg16" --work-dir "$WORK" \
  >"$DEST/bench-vgg16.log" 2>&1
echo "vgg16: exit $?"
grep -E "ready in|k=|x4 |GPU memory|FAILED|SKIP" "$DEST/bench-vgg16.log" | tail -n 30

echo "== stage 4: python -m bench ${SSD[*]}"
timeout --kill-after=10 "$SSD_LIMIT" "$PY" -m bench "${SSD[@]}" --out "$DEST/ssd300" --work-dir "$WORK" \
  >"$DEST/bench-ssd300.log" 2>&1
echo "ssd300: exit $?"
grep -E "ready in|k=|x4 |GPU memory|FAILED|SKIP" "$DEST/bench-ssd300.log" | tail -n 30

echo "== stage 5: report"
timeout 30 "$PY" -m bench.gpu_report "$DEST" --commit "$COMMIT" >"$DEST/report.log" 2>&1 || cat "$DEST/report.log"
grep -E "^\| (ours|that|target)|passed|FAILED|^wrote" "$DEST/report.log" | head -n 40
cp "$DEST"/gpu-*.md "$DEST"/gpu-*.json "$TOP"/ 2>/dev/null
# the device tool brings back at most 8 files, two folders deep: the report and the log as
# files, the rest (logs, results.json, table.md, plots, server logs) packed
tar -C "$DEST" -czf "$TOP/all.tar.gz" . && [ -n "${OUT:-}" ] && rm -rf "$DEST"
echo "gpu.sh: finished in $(( $(date +%s) - START )) s; results in $TOP ($(ls "$TOP" | tr '\n' ' '))"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # gpu.log complete before the device tool collects $OUT
