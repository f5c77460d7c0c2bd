#!/usr/bin/env bash
# One H100 call: every GPU test, the 1B engine benchmark against HF, and the server
# benchmark on the 1B AWQ checkpoint it builds.  Run from a clean worktree of HEAD with the
# wheels the host lacks in ../.device_wheels (gguf, transformers 5.23, the serve extra):
#   cd .clean && bash scripts/gpu_session3.sh        (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_session3}"
mkdir -p "$OUT"
WHEELS="${WHEELS:-../.device_wheels}"
python -m pip install -q --no-deps "$WHEELS"/*.whl 2>&1 | grep -v "root" | tail -n 2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
timeout "${TEST_S:-240}" python -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"; tail -n 15 "$OUT/gpu_tests.log"
if [ "${SKIP_BENCH:-0}" = "1" ]; then exit 0; fi
start=$(date +%s)
timeout "${ENGINE_S:-200}" python scripts/bench_gpu_engine.py --shapes llama-3.2-1b --out "$OUT" \
    > "$OUT/engine_1b.log" 2>&1
echo "engine bench rc=$? in $(( $(date +%s) - start )) s"; tail -n 12 "$OUT/engine_1b.log"
start=$(date +%s)
timeout "${SERVE_S:-150}" python scripts/bench_serve.py --source /tmp/qrt_bench_ckpt/llama-3.2-1b-awq \
    --server-args "--device cuda --max-num-seqs 256" --concurrency 1,16,64 --max-tokens 128 \
    --json "$OUT/serve.json" > "$OUT/serve.log" 2>&1
echo "serve bench rc=$? in $(( $(date +%s) - start )) s"; tail -n 12 "$OUT/serve.log"
