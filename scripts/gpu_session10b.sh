#!/usr/bin/env bash
# Session 10, second H100 call: the Gluon GEMM tests (ws_matmul's candidates now include
# the register-A kernel), per-config sweep on the other shapes, and wq_matmul as
# dispatched (bench_wq_graphs.py) for int4 group 128.  Results under $OUT.
set -o pipefail
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_wheels/*.whl 2>&1 | grep -v "root" | tail -2
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/s10}"; mkdir -p "$OUT"
timeout 150 python -m pytest -q -m gpu tests/test_gluon_wq_gemm.py -k "tunes_once or dispatch" -p no:cacheprovider 2>&1 | tail -5
timeout 200 python scripts/bench_wq_ws.py --shapes 4096x4096,4096x14336,14336x4096 --ms 64,128,256,512,1024,4096 --out "$OUT/ws_other.json" 2>&1 | grep -v "^    " | tee "$OUT/bench_other.log"
timeout 220 python scripts/bench_wq_graphs.py --formats int4-g128 --out "$OUT/graphs.json" 2>&1 | tail -12 | tee "$OUT/graphs.log"
