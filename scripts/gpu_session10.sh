#!/usr/bin/env bash
# Session 10 on the H100 (device tool, carry .device_wheels): the register-A Gluon GEMM's
# GPU tests, then bench_wq_ws.py (both Gluon kernels per config vs cuBLAS) to $OUT.
#   bash scripts/gpu_session10.sh [shapes] [ms]
set -o pipefail
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_wheels/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/s10}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${TEST_S:-200}" python -m pytest -q -m gpu tests/test_gluon_wq_rs.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_rs.log"
echo "pytest rc=$?"
timeout "${BENCH_S:-300}" python scripts/bench_wq_ws.py --shapes "${1:-8192x8192}" --ms "${2:-64,128,256,512,1024,2048,4096}" --out "$OUT/ws.json" 2>&1 | tee "$OUT/bench.log" | tail -40
