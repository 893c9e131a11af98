"""pytest-benchmark comparison of torch_logme.logme with the numpy reference.

Run explicitly (the project's test command only collects tests/)::

    python -m pytest benchmarks --benchmark-only

Each (N, D, C) shape is one benchmark group, so pytest-benchmark's table shows
the reference, torch_logme on the CPU and (when available) on CUDA side by
side. The problem setup is shared with benchmarks/table.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# table.py lives next to this file and holds the shared setup; make it
# importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import REF_NAME, SHAPES, make_problem, warm_up_reference, warm_up_torch  # noqa: E402

from torch_logme import logme  # noqa: E402
from torch_logme.reference import LogME as RefLogME  # noqa: E402

#: (rounds, warmup_rounds) per implementation and class count. The reference
#: takes seconds to tens of seconds per call at C >= 100, so it gets few rounds
#: and no warm-up round (numba is compiled beforehand on tiny data instead).
ROUNDS: dict[str, dict[int, tuple[int, int]]] = {
    "reference": {10: (3, 0), 100: (2, 0), 1000: (1, 0)},
    "torch_cpu": {10: (5, 1), 100: (3, 1), 1000: (3, 1)},
    "torch_cuda": {10: (20, 3), 100: (20, 3), 1000: (20, 3)},
}


def _rounds(impl: str, num_classes: int) -> tuple[int, int]:
    """(rounds, warmup_rounds); shapes added later get the slowest setting listed."""
    per_c = ROUNDS[impl]
    return per_c.get(num_classes, per_c[max(per_c)])


_HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def only_when_asked(request: pytest.FixtureRequest) -> None:
    """Skip unless benchmarks/ (or a file in it) was named on the command line.

    The project's test command collects tests/ only, but a bare ``pytest .``
    would otherwise spend minutes timing the reference. (A guard here rather
    than in a conftest.py: a second module named ``conftest`` would clash with
    tests/conftest.py when both folders are collected together.)
    """
    for arg in request.config.args:
        path = (request.config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return
    pytest.skip("benchmarks run only when named: python -m pytest benchmarks --benchmark-only")


def _shape_id(shape: tuple[int, int, int]) -> str:
    n, d, c = shape
    return f"N{n}-D{d}-C{c}"


@pytest.fixture(scope="module", params=SHAPES, ids=_shape_id)
def problem(request: pytest.FixtureRequest) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """(shape, features [N, D] float64, labels [N] int64), built once per shape."""
    return request.param, *make_problem(*request.param)


@pytest.fixture(scope="module")
def reference_warm() -> None:
    """Compile numba's reference kernels before anything is timed."""
    warm_up_reference()


def _label(shape: tuple[int, int, int]) -> str:
    n, d, c = shape
    return f"N={n} D={d} C={c}"


def test_reference(benchmark, problem, reference_warm) -> None:
    shape, f_np, y_np = problem
    benchmark.group = _label(shape)
    benchmark.name = REF_NAME
    rounds, warmup = _rounds("reference", shape[2])
    score = benchmark.pedantic(lambda: RefLogME().fit(f_np, y_np), rounds=rounds,
                               iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["score"] = score
    assert np.isfinite(score)


def test_torch_cpu(benchmark, problem) -> None:
    shape, f_np, y_np = problem
    benchmark.group = _label(shape)
    benchmark.name = f"torch_logme cpu float64 ({torch.get_num_threads()} threads)"
    f, y = torch.from_numpy(f_np), torch.from_numpy(y_np)
    warm_up_torch(torch.device("cpu"))
    rounds, warmup = _rounds("torch_cpu", shape[2])
    score = benchmark.pedantic(lambda: logme(f, y, dtype=torch.float64).item(), rounds=rounds,
                               iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["score"] = score
    assert np.isfinite(score)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_torch_cuda(benchmark, problem) -> None:
    shape, f_np, y_np = problem
    benchmark.group = _label(shape)
    benchmark.name = "torch_logme cuda (float32 features, float64 compute)"
    # Features are on the GPU before the clock starts: the scoring-right-after-
    # the-forward-pass case.
    f = torch.from_numpy(f_np).to("cuda", torch.float32)
    y = torch.from_numpy(y_np).to("cuda")
    warm_up_torch(torch.device("cuda"))
    torch.cuda.synchronize()

    def run() -> torch.Tensor:
        out = logme(f, y, dtype=torch.float64)
        torch.cuda.synchronize()  # time the kernels, not their launch
        return out

    rounds, warmup = _rounds("torch_cuda", shape[2])
    score = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup).item()
    benchmark.extra_info["score"] = score
    assert np.isfinite(score)
