"""Compiled fixed point against the pure-torch one, and logme end to end with each.

The GPU half of benchmarks/gpu_check.sh; also runs on the CPU (``--device
cpu``, small shapes), which is how its logic is checked without a GPU::

    python benchmarks/fixed_point_table.py --device cuda              # the three GPU shapes
    python benchmarks/fixed_point_table.py --device cpu --shapes small
    python benchmarks/fixed_point_table.py --device cuda --json out.json   # also merge the figures into out.json

For each (N, D, C): Gaussian class features [N, D] made on the device in
float32 (the "right after the forward pass" case), float64 compute. The
fixed point is timed on the spectrum of those features (k = D eigenvalues,
C columns), once through the compiled op and once through the pure-torch
loop; then ``logme`` end to end with the extension on and off
(``TORCH_LOGME_DISABLE_EXTENSION``). Each cell is the median of --repeat
runs after one warm-up, synchronised on CUDA; the two paths run in turn.
Prints one Markdown table; ``--json PATH`` also merges every figure into
the ``fixed_point_table`` section of PATH (benchmarks/_results.py). Runs from
a checkout with the op built in place (``python setup.py build_ext
--inplace``), with nothing installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

# Run as `python benchmarks/fixed_point_table.py`, Python puts benchmarks/ on
# sys.path, not the checkout: add it, so an uninstalled checkout (the op
# built in place) imports.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch_logme  # noqa: E402
from torch_logme import _extension, logme  # noqa: E402
from torch_logme._checks import prepare  # noqa: E402
from torch_logme._options import logme_options  # noqa: E402
from torch_logme.evidence import _fixed_point_compiled, _fixed_point_torch  # noqa: E402
from torch_logme.functional import solve  # noqa: E402

from _results import record  # noqa: E402

SHAPES = {
    "gpu": [(10_000, 768, 10), (50_000, 2048, 1000), (100_000, 4096, 1000)],
    "small": [(2_000, 64, 10), (4_000, 256, 100)],
    "cpu": [(10_000, 768, 10), (20_000, 1024, 1000)],
}


def make_problem(n: int, d: int, c: int, device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features [n, d] float32 around class means, labels [n] in 0..c-1 (every class present)."""
    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n, device=device) % c
    centres = torch.randn(c, d, generator=g, device=device)
    features = torch.randn(n, d, generator=g, device=device).add_(centres[labels], alpha=0.7)
    return features, labels


def timed(fns: Dict[str, Callable[[], object]], device: torch.device, repeat: int) -> Dict[str, float]:
    """Median wall time in ms of each fn, after one warm-up each.

    The fns run in turn, repeat times, so that load from elsewhere on a
    shared machine falls on all of them alike.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def with_extension(enabled: bool, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the compiled op allowed (or not) through the run-time switch."""
    def run() -> object:
        old = os.environ.get(_extension.DISABLE_ENV)
        os.environ[_extension.DISABLE_ENV] = "0" if enabled else "1"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[_extension.DISABLE_ENV]
            else:
                os.environ[_extension.DISABLE_ENV] = old
    return run


def row(n: int, d: int, c: int, device: torch.device, repeat: int) -> Dict[str, Any]:
    """The figures of one shape: times in ms, speed-ups, and the largest relative difference."""
    f, y = make_problem(n, d, c, device)
    options = logme_options()
    with torch.no_grad():
        spec, _ = solve(prepare(f, y, regression=False, num_classes=c, device=device), options, with_basis=False)
    args = (spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
            spec.whitened_sq, spec.outside_sq)
    fp = timed({"torch": lambda: _fixed_point_torch(*args), "compiled": lambda: _fixed_point_compiled(*args)},
               device, repeat)
    a, b = _fixed_point_compiled(*args).evidence, _fixed_point_torch(*args).evidence
    fp_err = ((a - b).abs().max() / b.abs().max()).item()
    runs = {name: with_extension(name == "compiled", lambda: logme(f, y, num_classes=c))
            for name in ("torch", "compiled")}
    e2e = timed(runs, device, repeat)
    scores = {name: fn().item() for name, fn in runs.items()}
    score_err = abs(scores["compiled"] - scores["torch"]) / abs(scores["torch"])
    return {
        "n": n, "d": d, "c": c, "k": int(spec.eigenvalues.shape[0]),
        "fixed_point_torch_ms": fp["torch"], "fixed_point_compiled_ms": fp["compiled"],
        "fixed_point_speedup": fp["torch"] / fp["compiled"],
        "logme_torch_ms": e2e["torch"], "logme_compiled_ms": e2e["compiled"],
        "logme_speedup": e2e["torch"] / e2e["compiled"],
        "max_rel_diff": max(fp_err, score_err),
    }


def cells(fig: Dict[str, Any]) -> List[str]:
    """The Markdown cells of one row."""
    return [
        f"{fig['n']}, {fig['d']}, {fig['c']}",
        f"{fig['fixed_point_torch_ms']:.2f}", f"{fig['fixed_point_compiled_ms']:.3f}",
        f"{fig['fixed_point_speedup']:.1f}x",
        f"{fig['logme_torch_ms']:.1f}", f"{fig['logme_compiled_ms']:.1f}", f"{fig['logme_speedup']:.2f}x",
        f"{fig['max_rel_diff']:.1e}",
    ]


def header(device: torch.device) -> str:
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return (
        f"device: {where}; torch {torch.__version__}; float32 features, float64 compute; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def main(argv: List[str]) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--shapes", default=None, choices=sorted(SHAPES), help="default: gpu on cuda, cpu on cpu")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per cell (median)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="merge the figures into the fixed_point_table section of this JSON file")
    args = parser.parse_args(argv)
    json_path: Optional[str] = args.json
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 1
    if not torch_logme.extension_available(device):
        print(f"the compiled extension does not serve {device.type}: {_extension.load_error() or 'no kernel'}",
              file=sys.stderr)
        return 1
    shapes = SHAPES[args.shapes or ("gpu" if device.type == "cuda" else "cpu")]
    print(header(device))
    print()
    print("| N, D, C | fixed point torch ms | compiled ms | speed-up "
          "| logme torch ms | logme compiled ms | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    record(json_path, "fixed_point_table", {"device": str(device), "repeat": args.repeat, "header": header(device)})
    for n, d, c in shapes:
        fig = row(n, d, c, device, args.repeat)
        print("| " + " | ".join(cells(fig)) + " |", flush=True)
        record(json_path, "fixed_point_table", {"rows": {f"{n}x{d}x{c}": fig}})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
