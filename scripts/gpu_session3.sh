#!/usr/bin/env bash
# H100 checks and benchmarks, in steps chosen by STEPS (default: all):
#   tests    every GPU test (pytest -m gpu)
#   prefill  scripts/bench_prefill_attention.py (Triton prefill vs the torch loop)
#   engine   scripts/bench_gpu_engine.py for SHAPES (default llama-3.2-1b), ours vs HF
#   serve    scripts/bench_serve.py on the 1B AWQ checkpoint the engine step builds
# Run from a clean worktree of HEAD with the wheels the host lacks in ../.device_wheels
# (gguf, transformers 5.23, the serve extra):
#   cd .clean && STEPS="tests engine" bash scripts/gpu_session3.sh      (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_session3}"
STEPS="${STEPS:-tests prefill engine serve}"
SHAPES="${SHAPES:-llama-3.2-1b}"
mkdir -p "$OUT"
WHEELS="${WHEELS:-../.device_wheels}"
python -m pip install -q --no-deps "$WHEELS"/*.whl 2>&1 | grep -v "root" | tail -n 2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local start; start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $(( $(date +%s) - start )) s"; tail -n "${TAIL:-14}" "$OUT/$name.log"
}
for s in $STEPS; do
    case $s in
        tests) step gpu_tests "${TEST_S:-240}" python -m pytest -m gpu -q -p no:cacheprovider tests ;;
        prefill) step prefill "${PREFILL_S:-90}" python scripts/bench_prefill_attention.py \
                     --tiles 64,64 128,64 64,32 ;;
        engine) step "engine_${SHAPES//,/_}" "${ENGINE_S:-300}" python scripts/bench_gpu_engine.py \
                    --shapes "$SHAPES" --out "$OUT" ;;
        serve) [ -f /tmp/qrt_bench_ckpt/llama-3.2-1b-awq/config.json ] || python \
                   scripts/make_random_checkpoint.py --shape llama-3.2-1b --format awq \
                   --out /tmp/qrt_bench_ckpt/llama-3.2-1b-awq > /dev/null
               step serve "${SERVE_S:-150}" python scripts/bench_serve.py \
                   --source /tmp/qrt_bench_ckpt/llama-3.2-1b-awq \
                   --server-args "--device cuda --max-num-seqs 256" --concurrency 1,16,64 \
                   --max-tokens 128 --json "$OUT/serve.json" ;;
    esac
done
