#!/usr/bin/env bash
# Create .venv with everything quantrt and its tests need, on a fresh machine.
# torch==2.13.0 goes in first: on the project's CPU machines it is a CPU build on local disk;
# a bare `pip install torch` would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,serve]"
