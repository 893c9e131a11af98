"""One harness for every registered score (``torch_logme.SCORES``), over the shared devices and dtypes.

For each score: the functional form against its numpy reference; for each
streaming score, its accumulator (batched, merged, state_dict round-trip,
two gloo ranks) against the functional form; bad inputs; inputs never
modified. The inputs and references come from ``score_table.TABLE``.
"""
from __future__ import annotations

import os

import pytest
import torch

from torch_logme import SCORES, accumulator
from torch_logme.registry import get_score, score_names

from conftest import DTYPES, batches, run_ranks
from score_table import TABLE

RTOL = 1e-9
NAMES = list(SCORES)
STREAMING = [name for name in NAMES if SCORES[name].streams]
COLLECTED = [name for name in NAMES if not SCORES[name].streams]
SHAPES = {"N>D": (240, 12, 4), "N<D": (30, 48, 3)}


def _close(actual, expected, rtol=RTOL, atol=1e-12) -> bool:
    actual, expected = float(actual), float(expected)
    return abs(actual - expected) <= atol + rtol * abs(expected)


def _inputs(name: str, shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(tensor inputs, tensor labels, float64 numpy copies) of a score's table entry."""
    x, y = TABLE[name].make(*SHAPES[shape], seed)
    xt = torch.from_numpy(x).to(device=device, dtype=dtype)
    return xt, torch.from_numpy(y).to(device), xt.double().cpu().numpy(), y


def _width(name: str, x: torch.Tensor):
    """What accumulator() takes as num_features: D for feature scores, None for prediction scores."""
    return x.shape[1] if SCORES[name].input == "features" else None


def test_every_registered_score_has_a_table_entry():
    assert set(TABLE) == set(SCORES), "add the new score to tests/score_table.py"


def test_specs_are_complete_and_read_only():
    for name, spec in SCORES.items():
        assert spec.name == name
        assert spec.input in ("features", "probs")
        assert isinstance(spec.larger_is_better, bool) and spec.mode in ("max", "min")
        assert spec.paper and callable(spec.fn)
    with pytest.raises(TypeError):
        SCORES["mine"] = SCORES["logme"]  # type: ignore[index]


def test_unknown_and_non_streaming_names():
    with pytest.raises(ValueError, match="unknown score 'logmee'; choose from logme, "):
        get_score("logmee")
    with pytest.raises(ValueError, match="unknown score"):
        accumulator("logmee", 4)
    with pytest.raises(ValueError, match="'leep' does not stream"):
        accumulator("leep")
    with pytest.raises(ValueError, match="needs num_features"):
        accumulator("gbc")
    with pytest.raises(ValueError, match="repeated"):
        score_names(["gbc", "gbc"])
    assert score_names("gbc") == ("gbc",)
    assert accumulator("nce", 5, num_classes=3).state_dict() is not None  # num_classes: NCE's target classes
    with pytest.raises(TypeError, match="same option"):
        accumulator("nce", 5, num_classes=3, num_target_classes=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_functional_equals_reference(name, shape, device, dtype):
    x, y, xn, yn = _inputs(name, shape, device, dtype)
    spec = SCORES[name]
    out = spec.fn(x, y)
    want = TABLE[name].reference(xn, yn)
    if spec.pooled:  # the per-model terms, in the spec's order; the reference returns the same
        assert out.shape == (len(spec.terms),) and bool(torch.isfinite(out).all())
        assert all(_close(a, b) for a, b in zip(out.tolist(), list(want))), (out.tolist(), want)
        return
    assert out.dim() == 0 and torch.isfinite(out)
    assert _close(out, want), (float(out), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", STREAMING)
def test_accumulator_equals_functional(name, shape, device, dtype):
    x, y, _, _ = _inputs(name, shape, device, dtype)
    want = SCORES[name].fn(x, y)
    batched = accumulator(name, _width(name, x))
    for rows in batches(x.shape[0], [1, 7, 32]):
        batched.update(x[rows], y[rows])
    assert _close(batched.compute(), want, rtol=1e-10)

    # Two halves merged, in either order.
    half = x.shape[0] // 2
    first, second = accumulator(name, _width(name, x)), accumulator(name, _width(name, x))
    first.update(x[:half], y[:half])
    second.update(x[half:], y[half:])
    assert _close(first.merge(second).compute(), want, rtol=1e-10)

    # A state_dict restored into a fresh accumulator, then fed the rest.
    resumed = accumulator(name, _width(name, x))
    part = accumulator(name, _width(name, x))
    part.update(x[:half], y[:half])
    resumed.load_state_dict(part.state_dict())
    resumed.update(x[half:], y[half:])
    assert _close(resumed.compute(), want, rtol=1e-10)

    batched.reset()
    batched.update(x, y)
    assert _close(batched.compute(), want, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", COLLECTED)
def test_collecting_accumulator_equals_functional(name, shape, device):
    """A score that cannot stream keeps its batches (collect=True): batched, merged, restored."""
    x, y, _, _ = _inputs(name, shape, device, torch.float64)
    want = SCORES[name].fn(x, y)
    batched = accumulator(name, x.shape[1], collect=True)
    for rows in batches(x.shape[0], [1, 7, 32]):
        batched.update(x[rows], y[rows])
    assert torch.equal(batched.compute(), want)  # the same rows, in the same order: the same arithmetic

    half = x.shape[0] // 2
    first, second = accumulator(name, x.shape[1], collect=True), accumulator(name, x.shape[1], collect=True)
    first.update(x[:half], y[:half])
    second.update(x[half:], y[half:])
    assert torch.equal(first.merge(second).compute(), want)

    resumed = accumulator(name, x.shape[1], collect=True)
    resumed.load_state_dict(second.state_dict() | {"rows": x[:half], "labels": y[:half]})
    resumed.update(x[half:], y[half:])
    assert torch.equal(resumed.compute(), want)
    with pytest.raises(ValueError, match="no tensor 'labels'"):
        resumed.load_state_dict({"rows": x, "config": resumed.state_dict()["config"]})
    assert torch.equal(resumed.compute(), want)  # a rejected load changed nothing
    with pytest.raises(ValueError, match=r"must be \[B, "):
        resumed.update(x[:, :-1], y)
    with pytest.raises(TypeError, match="takes no option 'bogus'"):
        accumulator(name, x.shape[1], collect=True, bogus=1)
    resumed.reset()
    with pytest.raises(ValueError, match="no batch yet"):
        resumed.compute()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_before_work(name, device):
    x, y, _, _ = _inputs(name, "N>D", device, torch.float64)
    fn = SCORES[name].fn
    with pytest.raises(ValueError, match="samples|rows|length|same number"):
        fn(x, y[:-1])
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite|NaN|nan"):
        fn(bad, y)
    if SCORES[name].streams:
        acc = accumulator(name, _width(name, x))
        with pytest.raises(ValueError):
            acc.update(x, y[:-1])
        acc.update(x, y)  # the failed update left nothing behind
        assert _close(acc.compute(), fn(x, y), rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_never_modified(name, device):
    x, y, _, _ = _inputs(name, "N>D", device, torch.float32)
    x_copy, y_copy = x.clone(), y.clone()
    SCORES[name].fn(x, y)
    if SCORES[name].streams:
        acc = accumulator(name, _width(name, x))
        acc.update(x, y)
        acc.compute()
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)


# -- two CPU processes (gloo): every streaming score, each rank half of the batches ------------


def _rank_scores(rank: int, out_dir: str) -> None:
    result = {}
    for name in STREAMING:
        x, y, _, _ = _inputs(name, "N>D", "cpu", torch.float64)
        acc = accumulator(name, _width(name, x))
        for i, rows in enumerate(batches(x.shape[0], [20])):
            if i % 2 == rank:
                acc.update(x[rows], y[rows])
        result[name] = acc.compute()
    for name in COLLECTED:  # gathered, not summed: every rank scores every row
        x, y, _, _ = _inputs(name, "N>D", "cpu", torch.float64)
        acc = accumulator(name, x.shape[1], collect=True)
        for i, rows in enumerate(batches(x.shape[0], [20])):
            if i % 2 == rank:
                acc.update(x[rows], y[rows])
        result[name] = acc.compute()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_ranks_equal_functional(tmp_path):
    run_ranks(_rank_scores, (str(tmp_path),))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in STREAMING:
            x, y, _, _ = _inputs(name, "N>D", "cpu", torch.float64)
            assert _close(got[name], SCORES[name].fn(x, y), rtol=1e-10), (rank, name)
        for name in COLLECTED:  # rows in rank order, not batch order: the same set of samples
            x, y, _, _ = _inputs(name, "N>D", "cpu", torch.float64)
            assert torch.allclose(got[name], SCORES[name].fn(x, y), rtol=1e-10, atol=1e-12), (rank, name)
