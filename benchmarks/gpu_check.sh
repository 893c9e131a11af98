#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and a CUDA build of torch: build
# the extension with its CUDA kernel, run every CUDA test, then print
# - benchmarks/fixed_point_table.py: compiled vs pure-torch fixed point, and
#   logme end to end, at (N, D, C) in {(10000, 768, 10), (50000, 2048, 1000),
#   (100000, 4096, 1000)};
# - benchmarks/table.py: logme on the GPU against the reference, and at
#   (50000, 2048, 1000) against the floor Gram + eigh, with peak memory;
# - benchmarks/stream.py: the per-batch update cost at B = 256, D = 2048, and
#   10 million rows x 1024 streamed through one accumulator.
#
#   bash benchmarks/gpu_check.sh                 # build, test, table
#   bash benchmarks/gpu_check.sh --repeat 20     # extra arguments go to the table
#
# TORCH_CUDA_ARCH_LIST is honoured (default: the visible GPU). Exits non-zero
# when there is no GPU, the build fails, the CUDA kernel is missing, or a
# test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available() or torch.version.cuda is None:
    sys.exit(f"gpu_check: needs a CUDA GPU and a CUDA build of torch (torch {torch.__version__})")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY

echo "== build (CPU + CUDA kernels, in place)"
start=$(date +%s)
mkdir -p build
TORCH_LOGME_CUDA=1 "$PYTHON" setup.py build_ext --inplace >build/gpu-build.log 2>&1 || { tail -40 build/gpu-build.log; exit 1; }
echo "built in $(( $(date +%s) - start )) s (log: build/gpu-build.log)"
"$PYTHON" -c "import sys, torch_logme; sys.exit(0 if torch_logme.extension_available('cuda') else 'gpu_check: the CUDA kernel is not available')"

echo "== CUDA tests"
"$PYTHON" -m pytest -q -p no:cacheprovider tests -k cuda

echo "== fixed point and end to end, compiled vs pure torch"
"$PYTHON" benchmarks/fixed_point_table.py --device cuda "$@"

echo "== logme on the GPU: against the reference, and against Gram + eigh alone"
"$PYTHON" benchmarks/table.py --device cuda --shapes all --repeat 3 --check

echo "== streaming: update cost and 10M rows"
"$PYTHON" benchmarks/stream.py --device cuda --rows 10000000
