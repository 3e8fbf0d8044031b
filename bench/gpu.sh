#!/usr/bin/env bash
# The GPU proof in one command (about 10 minutes on one H200: the GPU tests 5.5, the benchmarks 1.5 and 2):
#   1. installs what is missing: this package with its test extras, and flash-attn from a prebuilt wheel
#      matching this torch, CUDA and Python if one can be had (never a source build; otherwise it says so and
#      the adapter uses torch SDPA); on a machine without network, from the wheels in $WHEELS instead;
#   2. runs the GPU tests (pytest -m gpu tests: tests/gpu and the CUDA cases elsewhere);
#   3. runs bench/gpu.py: tokens/s, MFU and peak memory of the adapter against plain megatron-core on
#      7B-width layers; prints the table and writes it, BENCHMARKS.md-ready, to runs/bench_gpu/gpu.md;
#   4. runs bench/ckpt_state.py --gpu: saving and loading a training checkpoint (336M parameters, bf16; 18 GB
#      of disk at most) against DeepSpeed's own, table in runs/bench_gpu/ckpt_state.md.
# Exit status: non-zero if the tests or a benchmark failed (the benchmarks run even when a test failed).
#
#   bash bench/gpu.sh                 # on a GPU machine; extra arguments go to bench/gpu.py
#   bash bench/gpu.sh --cpu-smoke     # tiny sizes on the CPU: the whole benchmark path, no installs, no tests
# Environment: PYTHON (default .venv/bin/python, else python3), FLASH_ATTN_WHEEL (a wheel file or URL to
# install instead of looking one up), FLASH_ATTN_VERSION (default 2.8.3), WHEELS (offline: a folder of wheels
# for what the machine lacks, e.g. deepspeed, megatron-core, pydantic, pydantic-core, annotated-types,
# typing-inspection, hjson, made elsewhere with `pip download --no-deps --python-version ...` and
# `pip wheel --no-deps deepspeed`; installed with --no-deps into WHEELS_TARGET, default /tmp/site, and put on
# PYTHONPATH; a flash_attn wheel among them is used, else none is looked up).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--cpu-smoke" ]; then
    echo "== --cpu-smoke: no installs and no GPU tests (the default test run collects and skips them)"
    exec "$PYTHON" bench/gpu.py "$@"
fi

echo "== 1/4 install"
if [ -n "${WHEELS:-}" ]; then
    target="${WHEELS_TARGET:-/tmp/site}"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$target" "$WHEELS"/*.whl \
        || { echo "gpu.sh: cannot install the wheels in $WHEELS"; exit 2; }
    export PYTHONPATH="$target:$PYTHONPATH"
elif ! "$PYTHON" -c "import adapter, deepspeed, megatron.core, pytest" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet -e ".[test]" || { echo "gpu.sh: cannot install the package"; exit 2; }
fi
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
    echo "flash-attn $("$PYTHON" -c "import flash_attn; print(flash_attn.__version__)") already installed"
elif [ -n "${WHEELS:-}" ] && [ -z "${FLASH_ATTN_WHEEL:-}" ]; then
    echo "flash-attn: NOT installed (offline, none in $WHEELS); the adapter uses torch SDPA and the flash-attn" \
         "tests are skipped"
else
    wheel="${FLASH_ATTN_WHEEL:-$("$PYTHON" - <<'EOF'
import os, platform, sys
import torch
version = os.environ.get("FLASH_ATTN_VERSION", "2.8.3")
cuda = (torch.version.cuda or "0").split(".")[0]
abi = "TRUE" if torch._C._GLIBCXX_USE_CXX11_ABI else "FALSE"
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
print(f"https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/flash_attn-{version}+cu{cuda}"
      f"torch{torch_mm}cxx11abi{abi}-{py}-{py}-linux_{platform.machine()}.whl")
EOF
)}"
    echo "flash-attn: trying the prebuilt wheel $wheel"
    if timeout 120 "$PYTHON" -m pip install --quiet --no-deps "$wheel" && "$PYTHON" -c "import flash_attn"; then
        echo "flash-attn installed"
    else
        echo "flash-attn: NOT installed (no prebuilt wheel for this torch/CUDA/Python, or no network);" \
             "the adapter uses torch SDPA and the flash-attn test is skipped"
    fi
fi

echo "== 2/4 pytest -m gpu"
"$PYTHON" -m pytest -q -m gpu tests -rs
tests=$?

echo "== 3/4 benchmark"
"$PYTHON" bench/gpu.py "$@"
bench=$?

echo "== 4/4 checkpoint benchmark"
"$PYTHON" bench/ckpt_state.py --gpu --layouts dp1 --dtype bf16 --hidden 2048 --layers 4 --vocab 32000 \
    --repeats 2 --out runs/bench_gpu
ckpt=$?

echo "== done: tests exit $tests, benchmarks exit $bench and $ckpt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$ckpt" -eq 0 ]
