"""The JSON file of measured figures that the benchmark scripts and gpu_check.sh share.

Each benchmark script takes ``--json PATH`` and merges its figures into one
section of that file (``fixed_point_table``, ``table``, ``stream``) as soon
as each row is measured, so a run cut short still keeps what it measured.
``gpu_check.sh`` adds the machine, the build and the tests, then checks
with :func:`missing_figures` that every figure the check promises is there.

Nothing here imports torch: the shell script calls it between steps.

    python benchmarks/_results.py set PATH SECTION.KEY JSON_VALUE
    python benchmarks/_results.py check PATH MODE      # exit 1 and list what is missing
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["clean", "record", "load", "required_figures", "missing_figures", "main"]

#: The shapes and sizes the GPU check measures (issue 9 needs each figure).
GPU_FIXED_POINT_ROW = "50000x2048x1000"  # the compiled op at k = 2048, C = 1000
GPU_STREAM_ROWS = "10000000"  # 10M rows x 1024 features
#: Values a GPU run must have measured at: (dotted path, value).
GPU_SIZES = [
    ("fixed_point_table.rows.50000x2048x1000.k", 2048),
    ("table.floor.n", 50000), ("table.floor.d", 2048), ("table.floor.c", 1000),
    ("table.floor.device", "cuda"),
    ("stream.update.cuda.batch", 256), ("stream.update.cuda.features", 2048),
    ("stream.memory.cuda.10000000.features", 1024),
]



def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"

def clean(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _merge(into: Dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load(path: str) -> Dict[str, Any]:
    """The file's contents, or {} when it does not exist yet."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def record(path: Optional[str], section: str, figures: Mapping[str, Any]) -> None:
    """Merge ``figures`` into ``section`` of the JSON file at ``path`` (nothing when path is None).

    Nested dicts are merged key by key, so rows measured one at a time add
    up. The file is replaced in one step (write, then rename), so a run
    killed mid-write leaves the previous complete file.

    Args:
        path: the JSON file, created when absent; None to record nothing.
        section: top-level key (a dotted name nests: "build.kernels").
        figures: JSON-able values; NaN and infinities are stored as null.
    """
    if path is None:
        return
    data = load(path)
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    _merge(node, clean(figures))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def required_figures(mode: str) -> List[Tuple[str, bool]]:
    """Every figure the check writes, as (dotted path, may be null).

    A ``*`` stands for every entry of a dict, of which there must be at
    least one. On the CPU smoke run the GPU name, the CUDA version and the
    GPU memory peak are null; on a GPU run nothing may be.

    Args:
        mode: "gpu" or "cpu-smoke".
    """
    if mode not in ("gpu", "cpu-smoke"):
        raise ValueError(f"mode must be 'gpu' or 'cpu-smoke', got {mode!r}")
    gpu = mode == "gpu"
    dev = "cuda" if gpu else "cpu"
    paths: List[Tuple[str, bool]] = [
        ("environment.gpu", not gpu),
        ("environment.cuda", not gpu),
        ("environment.torch", False),
        ("environment.python", False),
        ("environment.cpu_count", False),
        ("build.seconds", False),
        ("build.ninja", False),
        ("build.cpu_kernel", False),
        ("build.cuda_kernel", False),
        ("tests.passed", False),
        ("tests.failed", False),
        ("tests.skipped", False),
    ]
    row = "fixed_point_table.rows." + (GPU_FIXED_POINT_ROW if gpu else "*")
    for name in ("fixed_point_torch_ms", "fixed_point_compiled_ms", "fixed_point_speedup",
                 "logme_torch_ms", "logme_compiled_ms", "logme_speedup", "max_rel_diff"):
        paths.append((f"{row}.{name}", False))
    for name in ("reference_s", "torch_s", "reference_over_torch", "max_rel_diff"):
        paths.append((f"table.rows.*.{name}", False))
    for name in ("n", "d", "c", "gram_eigh_ms", "logme_ms", "ratio_logme_over_floor",
                 "reference_subsample_rows", "reference_subsample_s", "reference_full_estimate_s",
                 "reference_over_logme_estimate", "cpu_cores"):
        paths.append((f"table.floor.{name}", False))
    paths.append(("table.floor.extra_peak_gb", not gpu))
    # Measured at full size when it fits the time budget, else null (and the
    # estimate above, labelled as such, stands in).
    paths.append(("table.floor.reference_full_s", True))
    paths.append(("table.floor.reference_over_logme", True))
    for name in ("batch", "features", "classes", "gram_update_ms", "update_checked_ms", "update_unchecked_ms"):
        paths.append((f"stream.update.{dev}.{name}", False))
    rows = GPU_STREAM_ROWS if gpu else "*"
    for name in ("rows", "seconds", "rows_per_s", "peak_rss_mib", "stream_gflops", "fraction_of_gemm"):
        paths.append((f"stream.memory.{dev}.{rows}.{name}", False))
    paths.append((f"stream.memory.{dev}.{rows}.peak_cuda_mib", not gpu))
    paths.append((f"stream.gemm.{dev}.gflops", False))
    return paths


def _lookup(node: Any, parts: List[str], here: str) -> List[Tuple[str, Any]]:
    """(path, value) of every match of parts under node; a missing key gives (path, KeyError)."""
    if not parts:
        return [(here, node)]
    key, rest = parts[0], parts[1:]
    if not isinstance(node, dict):
        return [(f"{here}.{key}".lstrip("."), KeyError)]
    if key == "*":
        if not node:
            return [(f"{here}.*".lstrip("."), KeyError)]
        out: List[Tuple[str, Any]] = []
        for name in node:
            out += _lookup(node[name], rest, f"{here}.{name}".lstrip("."))
        return out
    if key not in node:
        return [(f"{here}.{key}".lstrip("."), KeyError)]
    return _lookup(node[key], rest, f"{here}.{key}".lstrip("."))


def missing_figures(results: Mapping[str, Any], mode: str) -> List[str]:
    """The required figures (see :func:`required_figures`) absent from ``results``, or null where they may not be.

    On a GPU run, the sizes they were measured at must also be the ones the
    check promises (``GPU_SIZES``).

    Returns:
        Dotted paths, each with why: " (missing)", " (null)" or
        " (is X, expected Y)"; empty when complete.
    """
    problems = []
    for path, nullable in required_figures(mode):
        for where, value in _lookup(dict(results), path.split("."), ""):
            if value is KeyError:
                problems.append(f"{where} (missing)")
            elif value is None and not nullable:
                problems.append(f"{where} (null)")
    if mode == "gpu":
        # The figures must be of the sizes the GPU check promises, not smaller stand-ins.
        for path, want in GPU_SIZES:
            for where, value in _lookup(dict(results), path.split("."), ""):
                if value is KeyError:
                    problems.append(f"{where} (missing)")
                elif value != want:
                    problems.append(f"{where} (is {value!r}, expected {want!r})")
    return list(dict.fromkeys(problems))  # a missing row is named once, not once per figure


def main(argv: List[str]) -> int:
    """``set PATH SECTION.KEY JSON`` records one value; ``check PATH MODE`` lists what is missing."""
    if len(argv) == 4 and argv[0] == "set":
        _, path, key, value = argv
        section, _, name = key.rpartition(".")
        record(path, section or name, {name: json.loads(value)} if section else json.loads(value))
        return 0
    if len(argv) == 3 and argv[0] == "check":
        _, path, mode = argv
        missing = missing_figures(load(path), mode)
        for item in missing:
            print(f"missing figure: {item}")
        return 1 if missing else 0
    print("usage: _results.py set PATH SECTION.KEY JSON_VALUE | _results.py check PATH gpu|cpu-smoke",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
