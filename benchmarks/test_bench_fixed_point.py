"""pytest-benchmark: the compiled fixed point against the pure-torch one, on the CPU.

Target (issue 3): the compiled op is at least 3x faster at k = 1024
eigenvalues and C = 1000 columns. Run explicitly (the test command collects
tests/ only)::

    python -m pytest benchmarks/test_bench_fixed_point.py --benchmark-only
    python benchmarks/test_bench_fixed_point.py      # interleaved runs: medians and their ratio

The inputs are the spectrum of Gaussian class features (N = 20000,
D = k = 1024, C = 1000, float64), so each column stops on the step the
real problem takes it to. Both paths get the same tensors and give the same
numbers (tests/test_extension.py); only the time differs.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from torch_logme import extension_available
from torch_logme._checks import prepare
from torch_logme._options import logme_options
from torch_logme.evidence import FixedPointResult, _fixed_point_compiled, _fixed_point_torch
from torch_logme.functional import solve

N, K, C = 20_000, 1024, 1000
_HERE = Path(__file__).resolve().parent


def make_inputs(n: int = N, k: int = K, c: int = C, seed: int = 0) -> tuple:
    """Arguments of the fixed point for features [n, k] around c class means."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    centres = torch.randn(c, k, generator=g, dtype=torch.float64)
    features = torch.randn(n, k, generator=g, dtype=torch.float64).add_(centres[labels], alpha=0.7)
    options = logme_options()
    with torch.no_grad():
        spec, _ = solve(prepare(features, labels, regression=False, num_classes=c, device=None), options,
                        with_basis=False)
    return (spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
            spec.whitened_sq, spec.outside_sq)


PATHS: Dict[str, Callable[..., FixedPointResult]] = {
    "compiled": _fixed_point_compiled,
    "pure torch": _fixed_point_torch,
}


@pytest.fixture(scope="module", autouse=True)
def only_when_asked(request: pytest.FixtureRequest) -> None:
    """Skip unless benchmarks/ (or a file in it) was named on the command line."""
    pytest.importorskip("pytest_benchmark")
    for arg in request.config.args:
        path = (request.config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return
    pytest.skip("benchmarks run only when named: python -m pytest benchmarks --benchmark-only")


@pytest.fixture(scope="module")
def inputs() -> tuple:
    if not extension_available("cpu"):
        pytest.skip("the compiled extension is not built")
    return make_inputs()


@pytest.mark.parametrize("path", PATHS)
def test_fixed_point_cpu(benchmark, inputs, path) -> None:
    benchmark.group = f"fixed point, k={K} C={C}, cpu float64 ({torch.get_num_threads()} threads)"
    benchmark.name = path
    result = benchmark.pedantic(lambda: PATHS[path](*inputs), rounds=7, iterations=1, warmup_rounds=1)
    benchmark.extra_info["mean_steps"] = result.steps.double().mean().item()
    assert torch.isfinite(result.evidence).all()


def interleaved(inputs: tuple, rounds: int = 15) -> Dict[str, List[float]]:
    """Times in ms of each path, run alternately so that load on a shared machine hits both."""
    times: Dict[str, List[float]] = {name: [] for name in PATHS}
    for fn in PATHS.values():  # warm-up
        fn(*inputs)
    for _ in range(rounds):
        for name, fn in PATHS.items():
            start = time.perf_counter()
            fn(*inputs)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


if __name__ == "__main__":
    if not extension_available("cpu"):
        sys.exit("the compiled extension is not built")
    args = make_inputs()
    times = interleaved(args)
    med = {name: statistics.median(t) for name, t in times.items()}
    steps = _fixed_point_torch(*args).steps.double().mean().item()
    print(f"fixed point, k={K}, C={C}, float64, {torch.get_num_threads()} torch threads, mean steps {steps:.1f}")
    for name, t in times.items():
        print(f"  {name:>10}: median {med[name]:8.2f} ms  (min {min(t):.2f}, max {max(t):.2f}, {len(t)} runs)")
    print(f"  speed-up of the compiled op: {med['pure torch'] / med['compiled']:.1f}x")
