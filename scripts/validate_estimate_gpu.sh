#!/usr/bin/env bash
# Issue 8's H100 check: `quantrt estimate` against what the engine measures, on random-init
# Llama-3.2-1B / Llama-3-8B-shape checkpoints in bf16 and AWQ 4-bit
# (scripts/make_random_checkpoint.py), one 2048-token prefill each:
#   PYTHONPATH=. bash scripts/validate_estimate_gpu.sh [WORKDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/qrt_bench_ckpt}
for shape in llama-3.2-1b llama-3-8b; do
    for fmt in bf16 awq; do
        dir="$work/$shape-$fmt"
        [ -f "$dir/config.json" ] || python scripts/make_random_checkpoint.py --shape "$shape" \
            --format "$fmt" --out "$dir" > /dev/null
        echo "## $shape $fmt"
        python -m quantrt.estimate.validate "$dir" --tokens 2048
    done
done
