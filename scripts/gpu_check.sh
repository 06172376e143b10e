#!/usr/bin/env bash
# Every GPU-only test and benchmark in one go on a CUDA machine; writes one JSON (default
# gpu_check.json): pytest -m gpu, then bf16/bnb4/bnb8/int8/int4/onnx/TensorRT side by side on a tiny
# checkpoint, the same at the released widths with 2 LM layers plus the speed against a re-run of
# OpenVLA's predict_action. Extra arguments go to `openvla-ros bench gpu` (e.g. --with-7b, --no-wide).
# Usage: scripts/gpu_check.sh [OUT.json] [options]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
[ "$#" -gt 0 ] && shift
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" -m openvla_ros.cli bench gpu --out "$OUT" "$@"
