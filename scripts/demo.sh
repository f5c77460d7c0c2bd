#!/usr/bin/env bash
# The main job on the embedded default model: set up, then generate with the demo GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/quantrt run demo -p "${1:-The capital of France is}" --max-tokens "${2:-32}" --temperature 0 --stats
