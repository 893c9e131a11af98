"""benchmarks/gpu_check.sh and its helpers, on any machine.

The GPU check runs on a bare machine where nothing is installed, so every
script it runs must import the package from its own checkout. Its JSON file
must hold every figure it promises; the checker of that, the merging of
figures, the test counts and the verdict are tested here on made-up
results. The script itself runs in CI as ``bash benchmarks/gpu_check.sh
--cpu-smoke`` (.ci/run), in an environment where the package is not
installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _results  # noqa: E402
import gpu_check  # noqa: E402

MARKER = "torch_logme imported from"


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory) -> Path:
    """The package and the benchmarks in a fresh folder, the package saying where it is imported from."""
    copy = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    shutil.copytree(ROOT / "torch_logme", copy / "torch_logme", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks", copy / "benchmarks", ignore=ignore)
    init = copy / "torch_logme" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport sys as _s; print({MARKER!r}, __file__, file=_s.stderr)\n")
    return copy


@pytest.mark.parametrize("script, args", [
    ("fixed_point_table.py", ["--help"]),
    ("table.py", ["--help"]),
    ("stream.py", ["--help"]),
    ("gpu_check.py", ["environment", "--json", "{tmp}/env.json", "--mode", "cpu-smoke"]),
], ids=["fixed_point_table", "table", "stream", "gpu_check"])
def test_scripts_import_the_package_of_their_checkout(checkout_copy, tmp_path, script, args):
    """Run as `python benchmarks/X.py` from elsewhere, with no PYTHONPATH: the copy's package is used.

    Where the package is installed (CI's main environment), a script that
    did not put its checkout first would import the installed one; where it
    is not (the GPU machine), it would fail to import.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(checkout_copy / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line for line in done.stderr.splitlines() if line.startswith(MARKER)]
    assert imported == [f"{MARKER} {checkout_copy / 'torch_logme' / '__init__.py'}"]


def test_gpu_check_sh_arguments(tmp_path):
    usage = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0
    for word in ("--cpu-smoke", "--out", "GPU_CHECK_OUT", "gpu_check.log", "gpu_check.json"):
        assert word in usage.stdout
    wrong = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert wrong.returncode == 2 and "--bogus" in wrong.stderr


def test_record_merges_rows_and_writes_strict_json(tmp_path):
    path = str(tmp_path / "r.json")
    _results.record(None, "table", {"a": 1})  # no path: nothing written
    assert not os.path.exists(path)
    _results.record(path, "table", {"rows": {"1x2x3": {"reference_s": 1.5}}, "device": "cpu"})
    _results.record(path, "table", {"rows": {"4x5x6": {"reference_s": math.nan}}})
    _results.record(path, "steps.build", {"status": "ok"})
    text = Path(path).read_text()
    assert "NaN" not in text  # strict JSON: NaN is stored as null
    data = json.loads(text)
    assert data == {
        "table": {"rows": {"1x2x3": {"reference_s": 1.5}, "4x5x6": {"reference_s": None}}, "device": "cpu"},
        "steps": {"build": {"status": "ok"}},
    }
    assert _results.main(["set", path, "run.mode", '"gpu"']) == 0
    assert _results.load(path)["run"] == {"mode": "gpu"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def complete_results(mode: str) -> dict:
    """Made-up results that hold every required figure, with the GPU sizes on a GPU run."""
    data: dict = {}
    for path, _ in _results.required_figures(mode):
        node = data
        *parents, last = path.replace("*", "row").split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = 1.0
    if mode == "gpu":
        for path, value in _results.GPU_SIZES:
            *parents, last = path.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return data


@pytest.mark.parametrize("mode", ["gpu", "cpu-smoke"])
def test_missing_figures(mode):
    data = complete_results(mode)
    assert _results.missing_figures(data, mode) == []
    del data["stream"]["gemm"]
    data["table"]["floor"]["logme_ms"] = None
    data["table"]["floor"]["reference_full_s"] = None  # may be null: not measured when over budget
    data["table"]["rows"]["other"] = {}  # every row must have every figure
    dev = "cuda" if mode == "gpu" else "cpu"
    missing = _results.missing_figures(data, mode)
    assert f"stream.gemm.{dev}.gflops (missing)" not in missing  # the parent is named, once
    assert "stream.gemm (missing)" in missing
    assert "table.floor.logme_ms (null)" in missing
    assert "table.rows.other.reference_s (missing)" in missing
    assert not any("reference_full_s" in m for m in missing)
    assert len(missing) == len(set(missing))
    data["table"]["rows"] = {}
    assert "table.rows.* (missing)" in _results.missing_figures(data, mode)


def test_gpu_run_needs_the_gpu_sizes_and_names():
    data = complete_results("gpu")
    data["table"]["floor"]["n"] = 3000
    data["environment"]["gpu"] = None
    missing = _results.missing_figures(data, "gpu")
    assert "table.floor.n (is 3000, expected 50000)" in missing
    assert "environment.gpu (null)" in missing
    smoke = complete_results("cpu-smoke")
    smoke["environment"]["gpu"] = smoke["environment"]["cuda"] = None  # no GPU on the smoke run
    smoke["table"]["floor"]["extra_peak_gb"] = None
    assert _results.missing_figures(smoke, "cpu-smoke") == []
    with pytest.raises(ValueError, match="mode"):
        _results.required_figures("tpu")


def _junit(tmp_path: Path, cases: str) -> str:
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return str(path)


def test_junit_counts_and_verdict(tmp_path):
    json_path = str(tmp_path / "r.json")
    ok = '<testcase classname="tests.a" name="t1"/>'
    skip = '<testcase classname="tests.a" name="t2"><skipped message="no kernel"/></testcase>'
    fail = '<testcase classname="tests.a" name="t3"><failure message="boom"/></testcase>'
    assert gpu_check.junit(json_path, "cpu-smoke", _junit(tmp_path, ok + skip)) == 0
    assert _results.load(json_path)["tests"]["skipped_tests"] == ["tests.a::t2"]
    # On a GPU a skipped CUDA test checks nothing: the step fails.
    assert gpu_check.junit(json_path, "gpu", _junit(tmp_path, ok + skip)) == 1
    assert gpu_check.junit(json_path, "gpu", _junit(tmp_path, ok + fail)) == 1
    counts = _results.load(json_path)["tests"]
    assert (counts["passed"], counts["failed"], counts["failed_tests"]) == (1, 1, ["tests.a::t3"])
    assert gpu_check.junit(json_path, "gpu", str(tmp_path / "absent.xml")) == 1  # no test ran


def test_report_verdict(tmp_path, capsys):
    json_path = str(tmp_path / "r.json")
    data = complete_results("cpu-smoke")
    data["steps"] = {"build": {"status": "ok", "seconds": 20.0}, "tests": {"status": "ok", "seconds": 9.0}}
    Path(json_path).write_text(json.dumps(data))
    assert gpu_check.report(json_path, "cpu-smoke") == 0
    assert _results.load(json_path)["summary"] == {"failed_steps": [], "missing_figures": [], "ok": True}
    _results.record(json_path, "steps", {"tests": {"status": "timed out after 60 s", "seconds": 60.0}})
    assert gpu_check.report(json_path, "cpu-smoke") == 1
    assert "| tests | timed out after 60 s | 60 |" in capsys.readouterr().out
    assert _results.load(json_path)["summary"]["failed_steps"] == ["tests"]
