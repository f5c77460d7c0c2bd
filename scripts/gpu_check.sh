#!/usr/bin/env bash
# GPU check of the WQ kernels (quant_kernels/triton_wq*.py) and of the integer-format fixtures
# running on them, for the H100 host (carry .device_wheels: the gguf wheel):
#   bash scripts/gpu_check.sh [--quick]        (extra arguments go to bench_kernels.py)
# Runs the GPU tests, then the benchmark (JSON to $OUT/kernels.json), and prints the
# benchmark's markdown table last.  The repo is not installed there: PYTHONPATH=.
# WQ_SKIP_TESTS=1 skips the tests; QUANTRT_WQ_FAST_DEQUANT=0 disables the PTX dequant.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/wq_gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# the GPU host has no network: wheels it lacks travel in .device_wheels (pip download there)
if ls .device_wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | grep -v "as the .root. user" | tail -n 2
fi

test_rc=0
if [ "${WQ_SKIP_TESTS:-0}" != "1" ]; then
    start=$(date +%s)
    python -m pytest tests/test_triton_wq.py tests/test_quant_methods_gpu.py -m gpu -q \
        -p no:cacheprovider \
        > "$OUT/pytest.log" 2>&1
    test_rc=$?
    tail -n 25 "$OUT/pytest.log"
    echo "tests: rc=$test_rc in $(( $(date +%s) - start )) s (full log: $OUT/pytest.log)"
fi

python scripts/bench_kernels.py --out "$OUT/kernels.json" "$@" > "$OUT/bench.log" 2>&1
bench_rc=$?
# the run's progress lines are in bench.log; print only the final summary table
sed -n '/^## wq_matmul vs fp16/,$p' "$OUT/bench.log"
[ $bench_rc -ne 0 ] && tail -n 30 "$OUT/bench.log"
echo "bench: rc=$bench_rc, json: $OUT/kernels.json"
exit $(( test_rc != 0 || bench_rc != 0 ))
