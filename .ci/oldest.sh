#!/usr/bin/env bash
# CI, second environment: the oldest torch setup.py accepts (torch>=2.4), with
# torch_logme NOT installed, the way the GPU machine runs it.
#
# In a fresh copy of the checkout (so that the in-place build cannot touch the
# first environment's), with torch 2.4.1, numpy < 2 and the test extras:
#   1. bash benchmarks/gpu_check.sh --cpu-smoke: builds the op in place and runs
#      every step of the GPU check on the CPU at tiny sizes, checking that each
#      figure lands in its JSON file;
#   2. the whole test suite, with the checkout on PYTHONPATH.
#
# PyPI has only CUDA builds of torch 2.4 for Linux: the download is about
# 2.6 GB (the CUDA libraries load at import; no GPU is used). setup.py skips
# the CUDA kernel by itself here (nvcc 13 cannot build for torch's CUDA 12),
# and the smoke run asks for the CPU kernel only anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OLDEST_TORCH=2.4.1
START=$SECONDS

COPY="$ROOT/build/ci-oldest"
rm -rf "$COPY"
mkdir -p "$COPY"
# The files a clean clone has (tracked, or new and not ignored): no build
# outputs, no virtual environments.
git ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$COPY" -xf -

python3 -m venv .ci-venv-oldest
# shellcheck disable=SC1091
. .ci-venv-oldest/bin/activate
# One resolver run, torch pinned: nothing may move it to a newer release.
# The model zoos run their tests here (the first environment has no timm nor
# torchvision): torchvision 0.19.1 is the release made for torch 2.4.1, and
# timm and transformers are pinned to releases of that time (transformers 5
# needs torch >= 2.6). matplotlib runs the plots and the docs pages that draw them.
pip install "torch==$OLDEST_TORCH" "numpy<2" setuptools wheel ninja pytest "numba>=0.57" scipy \
  "torchmetrics>=1.0" "lightning>=2.0" "scikit-learn>=1.0" "hypothesis>=6" \
  "torchvision==0.19.1" "timm==1.0.11" "transformers==4.46.3" pillow matplotlib
python -c "import torch, numpy; print(f'oldest environment: torch {torch.__version__}, numpy {numpy.__version__}')"
# The zoo tests skip when a package cannot be imported; here all three must.
python -c "import torchvision, timm, transformers; print(f'zoos: torchvision {torchvision.__version__}, timm {timm.__version__}, transformers {transformers.__version__}')"
echo "oldest environment installed in $(( SECONDS - START )) s"

cd "$COPY"
SMOKE_START=$SECONDS
# CI checks that every step runs and every figure lands; the 2-minute target of
# the smoke run is for an idle machine, so a loaded CI machine gets more time.
GPU_CHECK_BUDGET_S=600 bash benchmarks/gpu_check.sh --cpu-smoke --out "$COPY/build/gpu_check"
echo "gpu_check.sh --cpu-smoke: $(( SECONDS - SMOKE_START )) s"
python -c "import sys, torch_logme; sys.exit(0 if torch_logme.extension_available('cpu') else 'the compiled CPU op was not built in place')"

SUITE_START=$SECONDS
PYTHONPATH="$COPY" python -m pytest -p no:cacheprovider
echo "test suite on torch $OLDEST_TORCH: $(( SECONDS - SUITE_START )) s; oldest environment in all: $(( SECONDS - START )) s"
