"""pytest-benchmark comparison of the other scores with their numpy references.

Run explicitly (the project's test command only collects tests/)::

    python -m pytest benchmarks/test_bench_scores.py --benchmark-only
    python -m pytest benchmarks/test_bench_scores.py --benchmark-only -k "gbc"

One benchmark group per score and shape, so pytest-benchmark's table shows
the reference, torch_logme on the CPU and (when available) on CUDA side by
side. ``python benchmarks/scores_table.py`` prints the same comparison as one
Markdown table. The problems are shared with that script.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scores_table import (  # noqa: E402
    ALL_SCORES,
    cases_of,
    make_case,
    reference_fn,
    shape_label,
    torch_fn,
    warm_up,
)

CASES = [(s, shape) for s in ALL_SCORES for shape in cases_of(s)]
ROUNDS = {"reference": 2, "cpu": 3, "cuda": 10}


def _id(case: tuple) -> str:
    score, (n, k, c) = case
    return f"{score}-N{n}-{k}-C{c}"


@pytest.fixture(scope="module", params=CASES, ids=_id)
def problem(request: pytest.FixtureRequest) -> tuple:
    """(score, shape, input [N, .], labels [N]), built once per case."""
    score, shape = request.param
    return (score, shape, *make_case(score, shape))


@pytest.fixture(scope="module", autouse=True)
def warm() -> None:
    warm_up(["cpu"] + (["cuda"] if torch.cuda.is_available() else []))


def _run(benchmark, fn, rounds: int):
    value = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["score"] = np.asarray(value).tolist()  # a float, or NCTI's terms
    assert np.all(np.isfinite(value))
    return value


def test_reference(benchmark, problem) -> None:
    score, shape, x, y = problem
    benchmark.group = f"{score} {shape_label(score, shape)}"
    benchmark.name = "reference (numpy)"
    _run(benchmark, reference_fn(score, x, y), ROUNDS["reference"])


def test_torch_cpu(benchmark, problem) -> None:
    score, shape, x, y = problem
    benchmark.group = f"{score} {shape_label(score, shape)}"
    benchmark.name = f"torch_logme cpu float64 ({torch.get_num_threads()} threads)"
    value = _run(benchmark, torch_fn(score, torch.from_numpy(x), torch.from_numpy(y)), ROUNDS["cpu"])
    assert value == pytest.approx(reference_fn(score, x, y)(), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_torch_cuda(benchmark, problem) -> None:
    score, shape, x, y = problem
    benchmark.group = f"{score} {shape_label(score, shape)}"
    benchmark.name = "torch_logme cuda (float32 input, float64 compute)"
    xc = torch.from_numpy(x).to("cuda", torch.int64 if score == "nce" else torch.float32)
    _run(benchmark, torch_fn(score, xc, torch.from_numpy(y).cuda()), ROUNDS["cuda"])
