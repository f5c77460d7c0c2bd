#!/usr/bin/env bash
# Session 11 on the H100 (device tool, carry .device_wheels): the decode configs of the
# register-operand Gluon GEMM (gluon_wq_decode) -- GPU tests, then bench_wq_ws.py at
# M <= 16 against cuBLAS and triton_wq_mma, each config and wq_matmul as dispatched.
#   bash scripts/gpu_session11.sh [shapes] [ms] [config labels]
set -o pipefail
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_wheels/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/s11}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -z "$SKIP_TESTS" ]; then
  timeout "${TEST_S:-240}" python -m pytest -q -m gpu tests/test_gluon_wq_decode.py ${TESTS_EXTRA} -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.log"
fi
timeout "${BENCH_S:-300}" python scripts/bench_wq_ws.py --shapes "${1:-8192x8192,4096x14336,14336x4096,4096x4096}" --ms "${2:-1,4,16}" --auto ${3:+--configs "$3"} --out "$OUT/decode.json" 2>&1 | tee "$OUT/bench.log" | tail -60
