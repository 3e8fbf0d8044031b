#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the adapter and its tests need (CPU-only torch).
# Usage: bash launch/setup.sh            (re-running it is cheap: pip skips what is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
# Install torch first and pinned: on a machine without it, a plain "torch" requirement pulls a multi-GB
# CUDA build. 2.13.0 is the CPU build this project is developed and tested with; any torch>=2.3 works.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
