#!/usr/bin/env bash
# Packaging check, from a clean clone (CPU-only machine, python3 with venv):
#   1. in a fresh venv with the pinned torch, build the sdist and the wheel
#      (`python -m build --sdist --wheel --no-isolation`: the wheel carries the
#      compiled CPU op), from a copy of the files a clean clone has;
#   2. check that the sdist holds every csrc/ source and header and the data
#      files, and that the wheel holds the compiled op and its build record;
#   3. in another fresh venv, install the sdist the documented way (torch,
#      setuptools and wheel first, then --no-build-isolation), and from a folder
#      outside the source tree check that the installed copy is imported, that
#      the compiled CPU op is in use, and run the commands and a LogME call;
#   4. in that venv, replace it by the wheel of step 1 and check again.
# torch is pinned everywhere, also as a constraint (-c) so that no dependency
# can move it: a plain `pip install torch` would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TORCH_PIN="torch==2.13.0"
START=$SECONDS
unset PYTHONPATH
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PIP_DISABLE_PIP_VERSION_CHECK=1

# The pin every pip call here runs under (-c), the one CI's other environment uses.
CONSTRAINTS="$ROOT/.ci/constraints.txt"
grep -qx "$TORCH_PIN" "$CONSTRAINTS" || { echo "$CONSTRAINTS does not pin $TORCH_PIN"; exit 1; }
WORK="$ROOT/build/ci-package"
rm -rf "$WORK"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/outside"
step() { echo "== package.sh: $1 ($(( SECONDS - START )) s so far)"; }

# The files a clean clone has (tracked, or new and not ignored): no build
# outputs, no compiled library, no stale egg-info.
git ls-files -z --cached --others --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -

step "1. build the sdist and the wheel"
python3 -m venv "$WORK/venv-build"
"$WORK/venv-build/bin/pip" install -q -c "$CONSTRAINTS" "$TORCH_PIN" setuptools wheel build ninja
T=$SECONDS
# The op is required here: the build fails, rather than warns, when it cannot compile it.
(cd "$WORK/src" && TORCH_LOGME_REQUIRE_EXTENSION=1 "$WORK/venv-build/bin/python" -m build --sdist --wheel \
  --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1) || { tail -n 60 "$WORK/build.log"; exit 1; }
echo "built in $(( SECONDS - T )) s: $(cd "$WORK/dist" && echo *)"
SDIST=$(echo "$WORK"/dist/torch[_-]logme-*.tar.gz)
WHEEL=$(echo "$WORK"/dist/torch_logme-*.whl)
if [ ! -f "$SDIST" ] || [ ! -f "$WHEEL" ]; then echo "expected one sdist and one wheel in $WORK/dist"; exit 1; fi

step "2. the sdist's and the wheel's contents"
"$WORK/venv-build/bin/python" - "$WORK/src" "$SDIST" "$WHEEL" <<'EOF'
import json, sys, tarfile, zipfile
from pathlib import Path

src, sdist, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with tarfile.open(sdist) as tar:
    names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
# Every file under csrc/ (sources, headers, CUDA), the data files, and what a build from the sdist reads.
wanted = {p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if p.is_file()}
assert {"csrc/fixed_point.h", "csrc/fixed_point.cpp", "csrc/cpu/fixed_point_cpu.cpp",
        "csrc/cuda/fixed_point_cuda.cu"} <= wanted, sorted(wanted)
wanted |= {p.relative_to(src).as_posix() for p in (src / "torch_logme" / "data").iterdir() if p.is_file()}
wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "torch_logme/_version.py"}
missing = sorted(wanted - names)
assert not missing, f"missing from the sdist: {missing}"
assert not [n for n in names if n.endswith((".so", ".pyc", ".o"))], "build outputs in the sdist"
print(f"sdist: {len(names)} files, every one of {len(wanted)} sources, headers and data files present")
with zipfile.ZipFile(wheel) as whl:
    files = whl.namelist()
    record = json.loads(whl.read(next(f for f in files if f.endswith(".dist-info/torch_logme_build.json"))))
assert any(f.startswith("torch_logme/_C") and f.endswith(".so") for f in files), "no compiled op in the wheel"
assert {"torch_logme/data/digits.npz", "torch_logme/data/README.md"} <= set(files)
assert record["compiled"] and record["kernels"] == ["cpu"], record
print(f"wheel: {len(files)} files, with torch_logme/_C, the data files and the build record {record['kernels']}")
EOF

# The checks an installed copy must pass, run from outside the source tree.
check_install() {
  local py="$1" what="$2"
  (
    cd "$WORK/outside"
    "$py" - "$WORK/src" <<'EOF'
import sys, sysconfig
from pathlib import Path

import torch
import torch_logme

src = Path(sys.argv[1]).resolve()
where = Path(torch_logme.__file__).resolve()
site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
assert any(s in where.parents for s in site), f"torch_logme imported from {where}, not site-packages {site}"
assert src not in where.parents, f"torch_logme imported from the source tree: {where}"
assert torch_logme.extension_available("cpu"), "the compiled CPU op is not in use"
f = torch.randn(60, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
y = torch.arange(60) % 3
score = float(torch_logme.logme(f, y))
assert score == score, "logme gave NaN"
print(f"imported from {where.parent}; compiled CPU op in use; logme = {score:.6f}")
EOF
    "${py%/python}/torch-logme" --version
    "$py" -m torch_logme info
    "$py" -m torch_logme info --json | "$py" -c "
import json, sys
info = json.load(sys.stdin)
assert info['install']['kind'] == 'installed', info['install']
assert info['install']['build_record']['compiled'], info['install']
assert info['extension']['in_use']['cpu'] and not info['hints'], info
"
    "$py" -m torch_logme demo --no-reference > "$WORK/demo-$what.log" 2>&1 \
      || { cat "$WORK/demo-$what.log"; echo "demo failed ($what)"; exit 1; }
    tail -n 3 "$WORK/demo-$what.log"
  )
  echo "$what: installed copy checked"
}

step "3. install the sdist the documented way"
python3 -m venv "$WORK/venv-install"
VPIP="$WORK/venv-install/bin/pip"
VPY="$WORK/venv-install/bin/python"
T=$SECONDS
# The README's way, with the constraint added; --no-cache-dir: a wheel that an
# earlier build left in pip's cache must not stand in for this build.
"$VPIP" install -q -c "$CONSTRAINTS" "$TORCH_PIN" setuptools wheel
"$VPIP" install -q -c "$CONSTRAINTS" --no-cache-dir --use-pep517 --no-build-isolation "$SDIST"
echo "sdist installed (op compiled) in $(( SECONDS - T )) s"
check_install "$VPY" sdist

step "4. install the wheel"
T=$SECONDS
"$VPIP" uninstall -q -y torch-logme
"$VPIP" install -q -c "$CONSTRAINTS" --no-cache-dir "$WHEEL"
echo "wheel installed in $(( SECONDS - T )) s"
check_install "$VPY" wheel

rm -rf "$WORK/venv-build" "$WORK/venv-install"
echo "package.sh: passed in $(( SECONDS - START )) s"
