#!/usr/bin/env bash
# GPU check: from a clean checkout, on a machine with a CUDA GPU, python3
# with a CUDA build of torch, nvcc, pytest, numpy (numba and scipy for the
# reference at full speed) and no network: nothing is installed.
#
#   1. environment  the GPU, torch, CUDA, nvcc, ninja (the GPU's arch is read here)
#   2. build        the op in place (setup.py build_ext --inplace), CPU + CUDA
#                   kernels, for the visible GPU's architecture only, with ninja
#                   when there is one (else serially, and the log says so)
#   3. tests        every CUDA test (pytest -k cuda; none may skip)
#   4. fixed_point  benchmarks/fixed_point_table.py: compiled vs pure-torch fixed
#                   point and logme, at (10000, 768, 10), (50000, 2048, 1000),
#                   (100000, 4096, 1000)
#   5. table        benchmarks/table.py: logme on the GPU against the numpy(+numba)
#                   reference on the CPU cores, and at (50000, 2048, 1000) against
#                   Gram + eigh alone, with the extra peak GPU memory
#   6. stream       benchmarks/stream.py: the update at B = 256, D = 2048, and
#                   10 million rows x 1024 streamed, against float64 GEMM
#   7. report       every step's status, and a check that no figure is missing
#
# A failing step does not stop the others: everything runs, then the script
# exits 1 if any step failed (or timed out) or a figure is missing. The whole
# run is held to GPU_CHECK_BUDGET_S (default 360 s; each step also has a cap).
#
# Results: one log (gpu_check.log, everything printed, build included) and one
# JSON file (gpu_check.json, every figure measured, with the GPU's name and the
# torch and CUDA versions) in the folder given by --out DIR, else by
# $GPU_CHECK_OUT, else build/gpu_check/.
#
#   bash benchmarks/gpu_check.sh --out /tmp/results       # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke --out DIR    # the same steps on the CPU, tiny
#                                                         # sizes, CPU tests (CI runs this)
#
# --cpu-smoke builds the CPU kernel only, runs the CPU cases of the op and
# streaming tests (the whole suite runs in CI separately), and times every
# benchmark at tiny sizes, in under 2 minutes: it keeps the script, the
# benchmarks' options and their JSON working between GPU runs.
#
# Environment: PYTHON (default python3), GPU_CHECK_OUT, GPU_CHECK_BUDGET_S,
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's compute capability).
set -uo pipefail   # no -e: a failed step is recorded and the next one runs

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

MODE=gpu
OUT_DIR="${GPU_CHECK_OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; OUT_DIR="$2"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
OUT_DIR="${OUT_DIR:-$ROOT/build/gpu_check}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
JSON="$OUT_DIR/gpu_check.json"
rm -f "$JSON"
: >"$LOG"
WORK="$(mktemp -d)"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() {
  rm -rf "$WORK"
  # Let tee write the last lines before the script's caller reads the log.
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null
}
trap finish EXIT

PYTHON="${PYTHON:-python3}"
# Everything imports the package from this checkout (the op built in place),
# whatever is installed, and prints as it goes.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [ "$MODE" = gpu ]; then BUDGET="${GPU_CHECK_BUDGET_S:-360}"; else BUDGET="${GPU_CHECK_BUDGET_S:-120}"; fi
DEADLINE=$(( START + BUDGET ))
HAVE_TIMEOUT=0; command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1
FAILED=0

results() { "$PYTHON" benchmarks/_results.py "$@"; }
now() { date +%s.%N; }
elapsed() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# step NAME CAP_SECONDS COMMAND...: run COMMAND for at most CAP_SECONDS (and
# never past the deadline, less 10 s for the report), record its status and
# time in the JSON file's "steps", and go on whatever happened.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: not run, the ${BUDGET} s budget is spent"
    results set "$JSON" "steps.$name" '{"status": "not run (budget spent)", "seconds": 0}'
    FAILED=1
    return 1
  fi
  echo
  echo "== $name (at most ${limit} s) =="
  local t0 rc status
  t0=$(now)
  if [ "$HAVE_TIMEOUT" = 1 ]; then
    timeout --kill-after=10 "$limit" "$@"
  else
    "$@"
  fi
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  local secs; secs=$(elapsed "$t0" "$(now)")
  echo "== $name: $status, ${secs} s"
  results set "$JSON" "steps.$name" "{\"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $secs, \"limit_s\": $limit}"
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

echo "gpu_check ($MODE): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), checkout $ROOT"
echo "results: $LOG and $JSON"
results set "$JSON" run "{\"mode\": \"$MODE\", \"started\": \"$(date -u '+%Y-%m-%dT%H:%M:%SZ')\", \"budget_s\": $BUDGET, \"out\": \"$OUT_DIR\"}"

# -- 1. environment -----------------------------------------------------------
# ninja builds the three sources in parallel. It may be only a Python package
# (its binary beside python, or in the package): put it on PATH if so.
if ! command -v ninja >/dev/null 2>&1; then
  for dir in "$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")" \
             "$("$PYTHON" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)"; do
    if [ -n "$dir" ] && [ -x "$dir/ninja" ]; then export PATH="$dir:$PATH"; break; fi
  done
fi
if command -v ninja >/dev/null 2>&1; then
  NINJA=true; echo "ninja: $(command -v ninja) ($(ninja --version))"
else
  NINJA=false; echo "ninja: not found; setuptools will compile the sources one after another (slower)"
fi
if ! step environment 60 "$PYTHON" benchmarks/gpu_check.py environment --json "$JSON" --mode "$MODE" \
      --arch-file "$WORK/arch"; then
  if [ "$MODE" = gpu ]; then
    step report 30 "$PYTHON" benchmarks/gpu_check.py report --json "$JSON" --mode "$MODE"
    exit 1
  fi
fi

# -- 2. build -----------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  export TORCH_LOGME_CUDA=1
  # The visible GPU's architecture only (e.g. 9.0 on an H100/H200): one
  # target instead of five, the shortest nvcc time.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(cat "$WORK/arch" 2>/dev/null)}"
  echo "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
else
  export TORCH_LOGME_CUDA=0
fi
export MAX_JOBS="${MAX_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4)}"
BUILD_T0=$(now)
step build 240 "$PYTHON" setup.py build_ext --inplace
results set "$JSON" build "{\"seconds\": $(elapsed "$BUILD_T0" "$(now)"), \"ninja\": $NINJA, \"torch_cuda_arch_list\": \"${TORCH_CUDA_ARCH_LIST:-}\", \"torch_logme_cuda\": \"$TORCH_LOGME_CUDA\"}"
step extension 60 "$PYTHON" benchmarks/gpu_check.py extension --json "$JSON" --mode "$MODE"

# -- 3. tests -----------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100 --junitxml "$WORK/junit.xml")
if [ "$MODE" = gpu ]; then
  # Every test whose id names cuda: the CUDA cases of every device-parametrised test.
  PYTEST+=(-k cuda tests)
  # Several processes share the GPU when pytest-xdist is there.
  if "$PYTHON" -c "import xdist" 2>/dev/null; then PYTEST+=(-n 4); fi
  TESTS_CAP=180
else
  # The CPU cases of the op's and the accumulators' tests: the step's plumbing,
  # in seconds (CI runs the whole suite separately).
  PYTEST+=(-k cpu tests/test_extension.py tests/test_streaming.py)
  TESTS_CAP=60
fi
results set "$JSON" tests "{\"command\": \"$(printf '%s ' "${PYTEST[@]:1}" | sed 's/"/\\"/g')\"}"
step tests "$TESTS_CAP" "${PYTEST[@]}"
step test_counts 30 "$PYTHON" benchmarks/gpu_check.py junit --json "$JSON" --mode "$MODE" --xml "$WORK/junit.xml"

# -- 4-6. the tables ----------------------------------------------------------
if [ "$MODE" = gpu ]; then
  step fixed_point 90 "$PYTHON" benchmarks/fixed_point_table.py --device cuda --repeat 5 --json "$JSON"
  step table 150 "$PYTHON" benchmarks/table.py --device cuda --shapes all --repeat 3 --budget 5 --check \
    --floor-device cuda --floor-shape 50000,2048,1000 --reference-budget 60 --json "$JSON"
  step stream 90 "$PYTHON" benchmarks/stream.py --device cuda --rows 10000000 --repeat 20 --json "$JSON"
else
  step fixed_point 30 "$PYTHON" benchmarks/fixed_point_table.py --device cpu --shapes small --repeat 3 --json "$JSON"
  step table 40 "$PYTHON" benchmarks/table.py --device cpu --shapes smoke --repeat 1 --check \
    --floor-device cpu --floor-shape 3000,128,20 --reference-budget 10 --json "$JSON"
  step stream 40 "$PYTHON" benchmarks/stream.py --device cpu --rows 20000 --repeat 3 --batch 64 --features 256 \
    --classes 50 --stream-features 128 --stream-batch 1024 --json "$JSON"
fi

# -- 7. report ----------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
results set "$JSON" run "{\"finished\": \"$(date -u '+%Y-%m-%dT%H:%M:%SZ')\", \"wall_seconds\": $TOTAL}"
echo
echo "== report: ${TOTAL} s in all (budget ${BUDGET} s) =="
"$PYTHON" benchmarks/gpu_check.py report --json "$JSON" --mode "$MODE" || FAILED=1
echo "results: $LOG and $JSON"
exit "$FAILED"
