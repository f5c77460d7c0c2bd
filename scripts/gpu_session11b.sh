#!/usr/bin/env bash
# Session 11 on the H100 (device tool, carry .device_wheels), to $OUT:
#   bash scripts/gpu_session11b.sh tests   # the Gluon GEMMs' and wq_matmul's GPU tests
#   bash scripts/gpu_session11b.sh bench   # wq_matmul as dispatched against cuBLAS
set -o pipefail
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_wheels/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/s11}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$1" = tests ]; then
  timeout 560 python -m pytest -q -m gpu tests/test_gluon_wq_decode.py tests/test_gluon_wq_rs.py tests/test_triton_wq.py -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pytest.log"
else
  timeout 300 python scripts/bench_wq_graphs.py --formats int4-g128 --out "$OUT/graphs.json" 2>&1 | tee "$OUT/graphs.log" | tail -30
  timeout 250 python scripts/bench_wq_graphs.py --formats int4-g64,int4-g128-act --ms 1,16 --out "$OUT/graphs_other.json" 2>&1 | tee "$OUT/graphs_other.log" | tail -16
fi
