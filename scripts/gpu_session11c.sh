#!/usr/bin/env bash
# Session 11 on the H100 (device tool, carry .device_wheels): the decode GEMM's GPU tests,
# wq_matmul as dispatched at M <= 16 and, three times over, at M = 1024 (run-to-run
# spread), and ring depths of the register-operand GEMM at M = 1024/4096, to $OUT.
set -o pipefail
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_wheels/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/s11}"; mkdir -p "$OUT"
timeout 150 python -m pytest -q -m gpu tests/test_gluon_wq_decode.py -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/pytest.log"
timeout 150 python scripts/bench_wq_graphs.py --formats int4-g128 --ms 1,4,8,12,16 --out "$OUT/graphs_decode.json" 2>&1 | tee "$OUT/graphs_decode.log" | tail -20
for r in 1 2 3; do
  timeout 100 python scripts/bench_wq_graphs.py --formats int4-g128 --ms 1024 --out "$OUT/graphs_1024_$r.json" 2>&1 | tail -4
done
timeout 150 python scripts/bench_wq_ws.py --kernels rs --configs rs256x128w8s4,rs256x128w8s3,rs256x128w8s5,rs128x128w8s4,rs128x128w8s6,rs256x64w4s6 --shapes 8192x8192,4096x14336 --ms 1024,4096 --out "$OUT/rings.json" 2>&1 | tail -12
