"""Property tests (hypothesis): every public entry point, on random data of every kind.

Every registered score (``torch_logme.SCORES``, iterated, so a new score is
covered without an edit here), ``logme`` with its options, the ``LogME``
estimator, ``rank_models``, ``relabel`` and every streaming accumulator
(random batches, merge, state_dict round trip) run on random shapes
(N 1..40, D 1..12, C 1..6), label patterns (one class, absent ids below the
largest, sorted or shuffled ids, one huge id), input dtypes (float16,
bfloat16, float32, float64, int64; tensors, non-contiguous tensors and numpy
arrays), scales (1e-30 to 1e30, per column too), offsets up to 1e8, constant,
duplicated and all-zero columns, occasional NaN / Inf, compute dtypes float32
and float64, and random values of each score's own options. The property:

* the call returns finite values (every element), or raises ValueError or
  TypeError; only RuntimeWarning / UserWarning may be emitted on the way;
* input holding NaN or Inf raises ValueError;
* no input is modified (bytes, shape, strides and the tensor's version
  counter, which counts in-place writes even of equal values);
* an accumulator whose ``update`` raised is unchanged (its state_dict is
  equal before and after); ``compute`` and ``state_dict`` change nothing;
  ``merge`` does not change the accumulator merged in; a state_dict loaded
  into a fresh accumulator computes the same value, and is not tied to it.

Runs are reproducible (``derandomize=True``, no example database). The
environment variable TORCH_LOGME_HYPOTHESIS_SCALE multiplies every test's
number of examples (default 1; e.g. 10 for a long run), and
TORCH_LOGME_HYPOTHESIS_SEED=<int> draws another reproducible sequence. The
number of examples and of checked calls is printed in pytest's summary.
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pytest
import torch

import torch_logme
from torch_logme import SCORES, LogME, Ranking, accumulator, logme, rank_models, relabel
from torch_logme._options import ABSENT_CLASSES, METHODS, SOLVERS
from torch_logme.functional import REDUCTIONS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import given as _given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("TORCH_LOGME_HYPOTHESIS_SCALE", "1"))
#: Another reproducible sequence of examples than the default (derandomized) one, to explore further.
SEED = os.environ.get("TORCH_LOGME_HYPOTHESIS_SEED")

#: Examples, calls checked and their outcomes, over the whole module (printed at its end).
CASES: Counter = Counter()


def given(examples: int, **strategies: Any) -> Callable:
    """``hypothesis.given`` with this module's settings: reproducible, ``examples`` times the scale."""
    def wrap(test: Callable) -> Callable:
        run = settings(
            max_examples=max(1, round(examples * SCALE)), deadline=None, derandomize=SEED is None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )(_given(**strategies)(test))
        return run if SEED is None else hypothesis.seed(int(SEED))(run)
    return wrap


def cases_line() -> str:
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()) if k not in ("examples", "calls"))
    return (f"{CASES['examples']} examples, {CASES['calls']} checked calls ({outcomes}); "
            f"TORCH_LOGME_HYPOTHESIS_SCALE={SCALE:g}" + ("" if SEED is None else f", SEED={SEED}"))


class _CaseReport:
    """A plugin registered while this module runs: the case count in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("-", "tests/test_properties.py")
        terminalreporter.write_line(cases_line())


@pytest.fixture(scope="module", autouse=True)
def report_cases(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("torch_logme_property_cases"):
        manager.register(_CaseReport(), "torch_logme_property_cases")
    yield


# -- the property ------------------------------------------------------------------------------

_ALLOWED_WARNINGS = (RuntimeWarning, UserWarning)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's elements, in order (a fresh contiguous copy: NaN compares as its bits)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def _fingerprint(x: Any) -> Any:
    """Everything about ``x`` that a write would change: bytes, dtype, shape, strides, version."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        return ("tensor", t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t._version, _bytes(t))
    if isinstance(x, np.ndarray):
        return ("numpy", x.dtype, x.shape, x.strides, x.flags.writeable, x.tobytes())
    if isinstance(x, Mapping):
        return ("mapping", type(x), tuple((k, _fingerprint(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(_fingerprint(v) for v in x))
    return ("value", x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def _state(acc: Any) -> Any:
    """An accumulator's state_dict, with bitwise tensor copies (NaN compares equal to itself)."""
    def bits(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (v.dtype, tuple(v.shape), _bytes(v))
        if isinstance(v, Mapping):
            return {k: bits(w) for k, w in v.items()}
        return v
    return bits(acc.state_dict())


def _assert_finite(value: Any, what: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            assert bool(torch.isfinite(value).all()), f"{what} returned non-finite values: {value}"
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            assert np.isfinite(value).all(), f"{what} returned non-finite values: {value}"
    elif isinstance(value, float):
        assert math.isfinite(value), f"{what} returned {value}"
    elif isinstance(value, Ranking):
        for entry in value:
            for score, v in entry.scores.items():
                assert math.isfinite(v), f"{what}: {entry.name} has {score} = {v}"
    elif isinstance(value, (tuple, list)):
        for v in value:
            _assert_finite(v, what)


def check(what: str, call: Callable[[], Any], watched: Tuple[Any, ...] = (), *, bad: bool = False) -> Any:
    """Run ``call``: finite values or ValueError / TypeError, ``watched`` unchanged.

    ``bad``: the inputs hold NaN or Inf, so only a ValueError will do.
    Returns the result, or the exception raised.
    """
    before = [_fingerprint(x) for x in watched]
    CASES["calls"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out: Any = call()
        except (ValueError, TypeError) as err:
            out = err
    for w in caught:
        assert issubclass(w.category, _ALLOWED_WARNINGS), f"{what}: {w.category.__name__}: {w.message}"
    for x, fp in zip(watched, before):
        assert _same(_fingerprint(x), fp), f"{what} modified an input of type {type(x).__name__}"
    if isinstance(out, BaseException):
        assert not (bad and not isinstance(out, ValueError)), f"{what}: NaN/Inf input raised {out!r}"
        CASES[type(out).__name__] += 1
        return out
    assert not bad, f"{what} accepted NaN/Inf input and returned {out!r}"
    _assert_finite(out, what)
    CASES["finite"] += 1
    return out


# -- data --------------------------------------------------------------------------------------

# Decisions by chance go through sampled_from, which picks about uniformly; st.integers
# favours its bounds (0 comes up about a quarter of the time in 0..9).


def one_in(k: int) -> st.SearchStrategy:
    """True about once in ``k`` draws."""
    return st.sampled_from([True] + [False] * (k - 1))


def sizes(top: int) -> st.SearchStrategy:
    """A size N in 1..top, about uniform (N = 1 is one case in ``top``)."""
    return st.sampled_from(range(1, top + 1))


FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64)
HUGE_IDS = (10**4, 10**9, 2**40, 2**62)
#: Scale exponents (low, high) and largest offset exponent that an input dtype holds; others: -30..30, 8.
DTYPE_EXPONENTS = {torch.float16: (-3, 3, 3), torch.int64: (0, 15, 8)}


@dataclass
class Data:
    """Inputs as passed (tensor or numpy), with what the test needs to know about them."""

    x: Any  # features [N, D] or source probabilities [N, Cs]
    y: Any  # class ids [N]
    bad: bool  # x holds NaN or Inf
    n: int
    d: int
    top: int  # the largest label id


def _labels(draw: Callable, n: int, c: int, rng: np.random.Generator, huge: int = 1) -> np.ndarray:
    """Class ids [N] in one of the patterns (``huge``: the weight of one huge id, out of 6 + huge)."""
    patterns = ["random", "random", "one_class", "absent", "sorted", "shuffled_ids"] + ["huge"] * huge
    pattern = draw(st.sampled_from(patterns))
    if pattern == "one_class":
        return np.full(n, draw(st.integers(0, c - 1)), dtype=np.int64)
    if pattern == "absent":  # ids with gaps below the largest
        ids = np.sort(rng.choice(2 * c + 1, size=c, replace=False))
        return rng.choice(ids, n)
    y = rng.integers(0, c, n)
    if pattern == "sorted":
        y = np.sort(y)
    elif pattern == "shuffled_ids":  # classes named by a random permutation of their ids
        y = rng.permutation(c)[y]
    elif pattern == "huge":
        y[rng.integers(n)] = draw(st.sampled_from(HUGE_IDS))
    return y.astype(np.int64)


def _label_container(draw: Callable, y: np.ndarray) -> Any:
    kinds = ["tensor", "numpy", "float", "strided"]
    if y.max() < 2**31:
        kinds.append("int32")
    if y.max() < 256:
        kinds.append("uint8_numpy")
    kind = draw(st.sampled_from(kinds))
    if kind == "numpy":
        return y.copy()
    if kind == "float":
        return torch.tensor(y, dtype=torch.float64)
    if kind == "int32":
        return torch.tensor(y, dtype=torch.int32)
    if kind == "uint8_numpy":
        return y.astype(np.uint8)
    if kind == "strided":
        return torch.tensor(np.repeat(y, 2))[::2]
    return torch.tensor(y)


def _container(draw: Callable, values: np.ndarray, dtype: torch.dtype) -> Any:
    """``values`` [N, D] (float64) cast to ``dtype``, as a tensor, a non-contiguous tensor or a numpy array."""
    if dtype == torch.int64:
        values = np.clip(np.round(values), -(2.0**62), 2.0**62)
    kinds = ["tensor", "transposed", "numpy", "numpy_fortran", "numpy_reversed"]
    if dtype == torch.bfloat16:
        kinds = kinds[:2]
    kind = draw(st.sampled_from(kinds))
    with np.errstate(over="ignore"):
        t = torch.tensor(values).to(dtype)
    if kind == "tensor":
        return t
    if kind == "transposed":  # non-contiguous
        return t.T.contiguous().T
    a = t.numpy()
    if kind == "numpy_fortran":
        return np.asfortranarray(a)
    if kind == "numpy_reversed":  # negative strides
        return np.ascontiguousarray(a[::-1])[::-1]
    return a


def _is_bad(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind == "f" and not np.isfinite(x).all()
    return x.is_floating_point() and not bool(torch.isfinite(x).all())


def _poison(draw: Callable, values: np.ndarray, rng: np.random.Generator, clean: int) -> None:
    """Now and then (3 times in ``clean`` + 3), a NaN or an Inf somewhere."""
    kind = draw(st.sampled_from([None] * clean + ["nan", "inf", "-inf"]))
    if kind is not None:
        values[rng.integers(values.shape[0]), rng.integers(values.shape[1])] = float(kind)


@st.composite
def features(draw: Callable, max_n: int = 40, max_d: int = 12, n: Optional[int] = None,
             labels: Optional[np.ndarray] = None, clean: int = 9) -> Data:
    """Features [N, D] of every kind, and class ids [N] (``labels``: given ids, shared between models)."""
    if labels is not None:
        n = labels.shape[0]
    n = n if n is not None else draw(sizes(max_n))
    d = draw(st.integers(1, max_d))
    c = draw(st.sampled_from(range(1, 7)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = _labels(draw, n, c, rng) if labels is None else labels
    x = rng.standard_normal((n, d)) + 1.5 * rng.standard_normal((c, d))[y % c]
    structure = draw(st.sampled_from(["plain", "plain", "constant", "duplicated", "zero", "rank_one", "integers"]))
    if structure == "constant":
        cols = rng.random(d) < 0.5
        x[:, cols] = rng.standard_normal(int(cols.sum()))
    elif structure == "duplicated":
        x[:, rng.integers(d, size=d) < d // 2] = x[:, :1]
    elif structure == "zero":
        x[:] = 0
    elif structure == "rank_one":
        x = np.outer(x[:, 0], rng.standard_normal(d))
    elif structure == "integers":
        x = np.round(3 * x)
    dtype = draw(st.sampled_from(FEATURE_DTYPES))
    # Scales and offsets within what the input dtype holds, and now and then past it (float16
    # overflows to Inf, which must be refused; int64 and float16 round small values to 0).
    low, high, top = (-30, 30, 8) if draw(one_in(8)) else DTYPE_EXPONENTS.get(dtype, (-30, 30, 8))
    if draw(st.booleans()):
        x = x * 10.0 ** draw(st.integers(low, high))
    elif draw(st.booleans()):  # badly scaled: a factor per column
        spread = draw(st.integers(0, high))
        x = x * 10.0 ** rng.integers(max(low, -spread), spread + 1, d)
    if draw(st.booleans()):
        offset = 10.0 ** draw(st.floats(0, top)) * rng.choice([-1.0, 1.0], d if draw(st.booleans()) else 1)
        x = x + offset
    if dtype != torch.int64:
        _poison(draw, x, rng, clean)
    out = _container(draw, x, dtype)
    return Data(out, _label_container(draw, y), _is_bad(out), n, d, int(y.max()))


@st.composite
def probabilities(draw: Callable, max_n: int = 40, max_cs: int = 12, labels: Optional[np.ndarray] = None,
                  clean: int = 9) -> Data:
    """Source-class probabilities [N, Cs] (or, now and then, logits passed by mistake) and class ids [N]."""
    n = labels.shape[0] if labels is not None else draw(sizes(max_n))
    cs = draw(st.integers(1, max_cs))
    c = draw(st.sampled_from(range(1, 7)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = _labels(draw, n, c, rng) if labels is None else labels
    logits = rng.standard_normal((n, cs)) + 2.0 * rng.standard_normal((c, cs))[y % c]
    logits *= 10.0 ** draw(st.floats(-3, 3))
    kind = draw(st.sampled_from(["softmax", "softmax", "onehot", "uniform", "zero_columns", "logits"]))
    dtypes: List[torch.dtype] = list(FEATURE_DTYPES[:4])
    if kind == "logits":
        p = logits
    elif kind == "onehot":
        p = np.eye(cs)[logits.argmax(1)]
        dtypes.append(torch.int64)
    elif kind == "uniform":
        p = np.full((n, cs), 1.0 / cs)
    else:
        if kind == "zero_columns":  # source classes that never get any mass
            logits[:, rng.random(cs) < 0.5] = -np.inf
            logits[:, 0] = np.maximum(logits[:, 0], 0)
        e = np.exp(logits - logits.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
    dtype = draw(st.sampled_from(dtypes))
    if dtype != torch.int64:
        _poison(draw, p, rng, clean)
    out = _container(draw, p, dtype)
    return Data(out, _label_container(draw, y), _is_bad(out), n, cs, int(y.max()))


def data_for(spec: Any, **kwargs: Any) -> Any:
    """The inputs a registered score reads (its ``input``)."""
    return probabilities(**kwargs) if spec.input == "probs" else features(**kwargs)


# -- options -----------------------------------------------------------------------------------

#: Options the tests set themselves (or leave at their defaults): compute placement,
#: sizes and the task's kind.
MANAGED = {"dtype", "device", "sync_on_compute", "check_inputs", "num_classes", "num_target_classes",
           "num_source_classes", "regression", "num_targets"}
#: String options whose choices are known, by name (any other string option keeps its default,
#: or gets a bogus value).
CHOICES: Dict[str, Tuple[str, ...]] = {
    "reduction": tuple(REDUCTIONS), "method": METHODS, "solver": SOLVERS, "absent_classes": ABSENT_CLASSES,
}
#: Options whose default is None but which take a positive float.
FLOAT_OPTIONS = {"rcond": 1e-10, "tol": 1e-3}
COMPUTE_DTYPES = (torch.float32, torch.float64)


def _values(name: str, default: Any) -> Dict[str, list]:
    """Values of an option by kind: "valid", "maybe" (invalid for most options: 0, negative, inf)
    and "invalid" (never valid: NaN, a bogus choice, an int for a bool)."""
    if name in CHOICES:
        return {"valid": list(CHOICES[name]), "invalid": ["bogus"]}
    valid_none = []
    if name in FLOAT_OPTIONS and default is None:
        default, valid_none = FLOAT_OPTIONS[name], [None]
    if isinstance(default, bool):
        return {"valid": [True, False], "invalid": [1]}
    if isinstance(default, int):
        return {"valid": [default, 1, 2, 3, 2 * default, max(1, default // 2)], "maybe": [0, -1],
                "invalid": [2.5]}
    if isinstance(default, float):
        return {"valid": [default * 10.0**k for k in range(-6, 7)] + valid_none,
                "maybe": [0.0, -default, math.inf], "invalid": [math.nan]}
    if isinstance(default, str):
        return {"valid": [default], "maybe": ["bogus"]}
    return {"valid": [default]}


@st.composite
def options_of(
    draw: Callable, fn: Callable, skip: frozenset = frozenset(), spoil: int = 10
) -> Tuple[Dict[str, Any], str]:
    """Random keyword options of ``fn`` (each left out half of the time), bar the managed ones.

    Returns (options, their kind): "valid", "maybe" (one may be invalid) or
    "invalid" (one is: the call must raise ValueError or TypeError).
    """
    out: Dict[str, Any] = {}
    values: Dict[str, Dict[str, list]] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is p.empty:
            continue
        if p.name in MANAGED or p.name in skip or not draw(st.booleans()):
            continue
        values[p.name] = _values(p.name, p.default)
        out[p.name] = draw(st.sampled_from(values[p.name]["valid"]))
    # One call in ``spoil`` spoils one of them (if it has such values).
    if not out or not draw(one_in(spoil)):
        return out, "valid"
    name = draw(st.sampled_from(sorted(out)))
    kind = draw(st.sampled_from([k for k in ("maybe", "invalid") if k in values[name]] or ["valid"]))
    out[name] = draw(st.sampled_from(values[name][kind]))
    return out, kind


OPTION_KINDS = ("valid", "maybe", "invalid")


def _expect(out: Any, what: str, dtype: Any, options_kind: str) -> None:
    """An invalid compute dtype or option must raise ValueError / TypeError."""
    if _is_invalid_dtype(dtype) or options_kind == "invalid":
        assert isinstance(out, (ValueError, TypeError)), f"{what} took an invalid option (dtype={dtype})"


def _bad(data_bad: bool, dtype: Any, options_kind: str) -> bool:
    """Whether only a ValueError will do: NaN/Inf input, and no invalid option that may be named first."""
    return data_bad and not _is_invalid_dtype(dtype) and options_kind == "valid"


def compute_dtype() -> st.SearchStrategy:
    """float32 or float64, and now and then one that no score takes."""
    return st.sampled_from(list(COMPUTE_DTYPES) * 12 + [torch.float16, torch.int64])


def _is_invalid_dtype(dtype: Any) -> bool:
    return dtype not in COMPUTE_DTYPES


# -- every registered score ----------------------------------------------------------------------

NAMES = sorted(SCORES)
STREAMING = sorted(n for n, spec in SCORES.items() if spec.streams)


@pytest.mark.parametrize("name", NAMES)
@given(100, data=st.data())
def test_score(name, data):
    """spec.fn(inputs, labels, dtype=..., **options): finite (0-dim, or [T] terms) or a clear error."""
    CASES["examples"] += 1
    spec = SCORES[name]
    case = data.draw(data_for(spec))
    dtype = data.draw(compute_dtype())
    options, kind = data.draw(options_of(spec.fn, skip=frozenset({"reduction"})))
    what = f"{name}(dtype={dtype}, **{options})"
    out = check(what, lambda: spec.fn(case.x, case.y, dtype=dtype, **options), (case.x, case.y),
                bad=_bad(case.bad, dtype, kind))
    _expect(out, what, dtype, kind)
    if isinstance(out, torch.Tensor):
        assert out.dim() == (1 if spec.pooled else 0), f"{what} returned shape {tuple(out.shape)}"
        if spec.pooled:
            assert out.shape[0] == len(spec.terms), f"{what} returned {out.shape[0]} terms"
        assert out.dtype == dtype, f"{what} returned {out.dtype}"


@given(60, data=st.data())
def test_nce_of_hard_labels(data):
    """nce(source_labels, target_labels) and its accumulator on hard source labels [N]."""
    CASES["examples"] += 1
    n = data.draw(sizes(40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    target_ids = _labels(data.draw, n, data.draw(st.integers(1, 6)), rng)
    # Two huge ids of 10**4 would be allowed, as a [10**4, 10**4] table of counts (800 MB): one at most.
    source_ids = _labels(data.draw, n, data.draw(st.integers(1, 8)), rng, huge=int(target_ids.max() < 100))
    source = _label_container(data.draw, source_ids)
    target = _label_container(data.draw, target_ids)
    dtype = data.draw(compute_dtype())
    out = check("nce", lambda: torch_logme.nce(source, target, dtype=dtype), (source, target))
    _expect(out, "nce", dtype, "valid")
    acc = check("accumulator('nce')", lambda: accumulator("nce", dtype=dtype))
    if isinstance(acc, Exception):
        return
    for rows in _splits(data.draw, n):
        _update(acc, "NCEAccumulator.update", (source[rows], target[rows]), False)
    _compute(acc, "NCEAccumulator")


# -- logme and its options -------------------------------------------------------------------------


@st.composite
def regression_targets(draw: Callable, n: int) -> Tuple[Any, bool]:
    """Float targets [N] or [N, C] (C 1..6; 0/1 multi-label now and then), scaled; (targets, holds NaN/Inf)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["vector", "matrix", "multilabel", "column"]))
    c = draw(st.sampled_from(range(1, 7)))
    if shape == "vector":
        t = rng.standard_normal(n)
    elif shape == "multilabel":
        t = (rng.random((n, c)) < 0.5).astype(np.float64)
    else:
        t = rng.standard_normal((n, 1 if shape == "column" else c))
    t = t * 10.0 ** draw(st.integers(-30, 30)) + (10.0 ** draw(st.floats(0, 8)) if draw(st.booleans()) else 0.0)
    poison = draw(st.sampled_from([None] * 9 + ["nan", "inf"]))
    if poison is not None:
        t.reshape(-1)[rng.integers(t.size)] = float(poison)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]))
    if dtype == torch.int64:
        t = np.nan_to_num(np.clip(np.round(t), -(2.0**62), 2.0**62), nan=0.0, posinf=0.0, neginf=0.0)
    with np.errstate(over="ignore"):
        out = torch.tensor(t).to(dtype)
    out = out if draw(st.booleans()) else out.numpy()
    return out, _is_bad(out)


@st.composite
def logme_targets(
    draw: Callable, case: Data, options: Dict[str, Any], regression: Optional[bool] = None
) -> Tuple[Any, bool]:
    """Class ids (with num_classes now and then) or float targets (regression=True, set in ``options``).

    Returns (targets, whether they hold NaN/Inf)."""
    if regression is None:
        regression = draw(st.booleans())
    if regression:
        options["regression"] = True
        return draw(regression_targets(case.n))
    # num_classes is the caller's word (no check of its size): a huge one would ask for a huge state.
    choices = [None, None, case.top + 1, case.top + 4, max(1, case.top)] if case.top < 100 else [None, 5]
    given_classes = draw(st.sampled_from(choices))
    if given_classes is not None:
        options["num_classes"] = given_classes
    return case.y, False


@given(300, data=st.data())
def test_logme_options(data):
    """logme with random reduction, num_classes, absent_classes, solver, method, legacy_evidence and
    max_iter / tol, for class labels or float regression targets."""
    CASES["examples"] += 1
    case = data.draw(features())
    dtype = data.draw(compute_dtype())
    options, kind = data.draw(options_of(logme))
    targets, bad_targets = data.draw(logme_targets(case, options))
    what = f"logme(dtype={dtype}, **{options})"
    out = check(what, lambda: logme(case.x, targets, dtype=dtype, **options), (case.x, targets),
                bad=_bad(case.bad or bad_targets, dtype, kind))
    _expect(out, what, dtype, kind)
    if isinstance(out, torch.Tensor):
        assert out.dtype == dtype, f"{what} returned {out.dtype}"
        assert out.dim() == (1 if options.get("reduction") == "none" else 0), f"{what}: shape {tuple(out.shape)}"


# -- the estimator -----------------------------------------------------------------------------------


@given(120, data=st.data())
def test_estimator(data):
    """LogME(...).fit on random data, predict on the fit's features and on fresh ones, then a refit."""
    CASES["examples"] += 1
    case = data.draw(features())
    regression = data.draw(st.booleans())
    dtype = data.draw(compute_dtype())
    options, kind = data.draw(options_of(LogME))
    what = f"LogME(regression={regression}, dtype={dtype}, **{options})"
    est = check(what, lambda: LogME(regression, dtype=dtype, **options))
    _expect(est, what, dtype, kind)
    if isinstance(est, Exception):
        return
    targets, bad_targets = data.draw(logme_targets(case, {}, regression))
    fitted = check(f"{what}.fit", lambda: est.fit(case.x, targets), (case.x, targets),
                   bad=case.bad or bad_targets)
    other = data.draw(features(n=data.draw(st.integers(1, 10)), max_d=case.d))
    if isinstance(fitted, Exception):
        with pytest.raises(RuntimeError, match="before fit"):  # nothing fitted: nothing to predict with
            est.predict(case.x)
        return
    check(f"{what}.predict(fit features)", lambda: est.predict(case.x), (case.x,))
    if other.d == case.d:
        check(f"{what}.predict", lambda: est.predict(other.x), (other.x,), bad=other.bad)
    other_targets, other_bad = data.draw(logme_targets(other, {}, regression))
    check(f"{what}.fit again", lambda: est.fit(other.x, other_targets), (other.x, other_targets),
          bad=other.bad or other_bad)


# -- rank_models -----------------------------------------------------------------------------------


@given(100, data=st.data())
def test_rank_models(data):
    """rank_models over 1 to 3 models (features, probabilities or both) and any subset of the scores."""
    CASES["examples"] += 1
    n = data.draw(sizes(30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # Rarely a huge id, poisoned inputs or a bad option: any one fails the whole ranking.
    labels = _labels(data.draw, n, data.draw(st.integers(1, 5)), rng, huge=1 if data.draw(one_in(4)) else 0)
    names = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    kinds = sorted({SCORES[s].input for s in names})
    models: Dict[str, Any] = {}
    bad = False
    for m in range(data.draw(st.integers(1, 3))):
        parts = {}
        for kind in kinds:
            part = data.draw(probabilities(labels=labels, clean=40) if kind == "probs"
                             else features(labels=labels, clean=40))
            parts[kind] = part.x
            bad = bad or part.bad
        models[f"m{m}"] = parts if len(parts) > 1 or data.draw(st.booleans()) else parts[kinds[0]]
    score_options: Dict[str, Dict[str, Any]] = {}
    options_kind = "valid"
    for s in names:
        if data.draw(st.booleans()):
            score_options[s], k = data.draw(options_of(SCORES[s].fn, skip=frozenset({"reduction"}), spoil=40))
            options_kind = max(options_kind, k, key=OPTION_KINDS.index)
    y = _label_container(data.draw, labels)
    as_list = data.draw(st.booleans())
    given_models: Any = list(models.values()) if as_list else models
    dtype = data.draw(compute_dtype())
    what = f"rank_models({names}, dtype={dtype}, score_options={score_options})"
    out = check(what, lambda: rank_models(given_models, y, names, dtype=dtype, score_options=score_options),
                (given_models, y), bad=_bad(bad, dtype, options_kind))
    _expect(out, what, dtype, options_kind)
    if isinstance(out, Ranking):
        expected = [f"model_{i}" for i in range(len(models))] if as_list else list(models)
        assert sorted(out.models) == sorted(expected)
        assert list(out.scores) == names


# -- relabel --------------------------------------------------------------------------------------


@given(60, data=st.data())
def test_relabel(data):
    """relabel: ids 0..K-1 and the original ids, with ids[new] == labels; or a clear error."""
    CASES["examples"] += 1
    n = data.draw(sizes(40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    y = _labels(data.draw, n, data.draw(st.integers(1, 6)), rng)
    labels = _label_container(data.draw, y)
    flaw = data.draw(st.sampled_from([None] * 6 + ["negative", "fraction", "nan", "matrix"]))
    if flaw == "negative":  # relabel takes any integer ids, negative ones too
        labels = torch.as_tensor(labels).to(torch.int64) - 1 - int(y.max())
    elif flaw in ("fraction", "nan"):
        labels = torch.as_tensor(labels).to(torch.float64)
        labels[0] = 0.5 if flaw == "fraction" else math.nan
    elif flaw == "matrix":
        labels = torch.as_tensor(labels).reshape(1, -1).expand(2, -1)
    out = check("relabel", lambda: relabel(labels), (labels,))
    if isinstance(out, tuple):
        new, ids = out
        expected = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        assert new.dtype == torch.int64 and new.shape == expected.shape
        assert torch.equal(ids[new], expected)
        assert int(new.max()) == ids.numel() - 1
        assert flaw in (None, "negative", "matrix"), f"relabel took {flaw} labels"
    else:
        assert flaw not in (None, "negative"), f"relabel refused valid labels: {out!r}"


# -- accumulators --------------------------------------------------------------------------------


def _splits(draw: Callable, n: int) -> List[slice]:
    """Consecutive row slices of random sizes (1 to n) covering 0..n-1."""
    out, start = [], 0
    while start < n:
        stop = min(n, start + draw(st.integers(1, max(1, n))))
        out.append(slice(start, stop))
        start = stop
    return out


def _update(acc: Any, what: str, batch: Tuple[Any, Any], bad: bool) -> bool:
    """One update, checked: finite-or-clear-error, batch unchanged, and a failed update changes nothing."""
    before = _state(acc)
    out = check(what, lambda: acc.update(*batch), batch, bad=bad)
    if isinstance(out, Exception):
        assert _same(_state(acc), before), f"{what} raised {out!r} and changed the accumulator"
        return False
    return True


def _compute(acc: Any, what: str) -> Any:
    before = _state(acc)
    out = check(f"{what}.compute", acc.compute)
    assert _same(_state(acc), before), f"{what}.compute changed the accumulator"
    return out


@pytest.mark.parametrize("name", STREAMING)
@given(80, data=st.data())
def test_accumulator(name, data):
    """accumulator(name, ...): updates in random batches, compute, merge of two, state_dict round trip."""
    CASES["examples"] += 1
    spec = SCORES[name]
    case = data.draw(data_for(spec))
    cls = spec.accumulator_cls
    dtype = data.draw(compute_dtype())
    options, kind = data.draw(options_of(cls))
    targets, bad_targets = data.draw(logme_targets(case, options, None if "regression" in
                                                   inspect.signature(cls).parameters else False))
    checked = True
    if not (case.bad or bad_targets) and ("num_classes" in options or "regression" in options):
        checked = data.draw(st.booleans())  # unchecked, bad values would go unnoticed: finite data only
        if not checked:
            options["check_inputs"] = False
    width = case.d if spec.input == "features" or data.draw(st.booleans()) else None
    what = f"accumulator({name!r}, {width}, dtype={dtype}, **{options})"
    first = check(what, lambda: accumulator(name, width, dtype=dtype, **options))
    _expect(first, what, dtype, kind)
    if isinstance(first, Exception):
        assert kind != "valid" or _is_invalid_dtype(dtype), f"{what} refused valid settings: {first!r}"
        return
    second = accumulator(name, width, dtype=dtype, **options)
    single = accumulator(name, width, dtype=dtype, **options)
    x, y = case.x, targets
    whole = _fingerprint((x, y))
    for i, rows in enumerate(_splits(data.draw, case.n)):
        batch = (x[rows], y[rows])
        poisoned = checked and (_is_bad(batch[0]) or _is_bad(batch[1]))
        _update(single, f"{what}.update", batch, poisoned)
        _update(first if i % 2 == 0 else second, f"{what}.update", batch, poisoned)
    _compute(single, what)
    # merge: the accumulator merged in is unchanged
    before = _state(second)
    merged = check(f"{what}.merge", lambda: first.merge(second))
    assert not isinstance(merged, Exception), f"{what}.merge of two alike raised {merged!r}"
    assert _same(_state(second), before), f"{what}.merge changed the accumulator merged in"
    _compute(first, f"{what} merged")
    # state_dict round trip: the same value, and the saved state is tied to neither accumulator
    saved = single.state_dict()
    restored = accumulator(name, width, dtype=dtype, **options)
    loaded = check(f"{what}.load_state_dict", lambda: restored.load_state_dict(saved), (saved,))
    assert not isinstance(loaded, Exception), f"{what}.load_state_dict of its own state raised {loaded!r}"
    mine, theirs = _compute(single, what), _compute(restored, f"{what} restored")
    if isinstance(mine, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and torch.equal(mine, theirs), (mine, theirs)
    else:
        assert type(theirs) is type(mine), (mine, theirs)
    snapshot = _fingerprint(saved)
    more = (x[:1], y[:1])
    more_bad = checked and (_is_bad(more[0]) or _is_bad(more[1]))
    _update(restored, f"{what}.update after load", more, more_bad)
    _update(single, f"{what}.update after state_dict", more, more_bad)
    assert _same(_fingerprint(saved), snapshot), f"{what}: an update wrote into a state_dict"
    assert _same(_fingerprint((x, y)), whole), f"{what} modified the inputs it was given batch by batch"


# -- pooled scores' combinations ------------------------------------------------------------------

POOLED = [name for name, spec in SCORES.items() if spec.pooled]


@pytest.mark.parametrize("name", POOLED)
@given(60, data=st.data())
def test_combine(name, data):
    """A pooled score's combine over any pool of finite terms [M, T] (ties and a pool of one included) is finite."""
    CASES["examples"] += 1
    spec = SCORES[name]
    m = data.draw(st.integers(1, 6))
    values = data.draw(st.lists(st.sampled_from([-1e6, -2.5, 0.0, 0.5, 1.0, 3.0, 1e6]),
                                min_size=m * len(spec.terms), max_size=m * len(spec.terms)))
    terms = torch.tensor(values, dtype=torch.float64).reshape(m, len(spec.terms))
    out = check(f"{name} combine of {terms.tolist()}", lambda: spec.combine(terms), (terms,))
    if isinstance(out, torch.Tensor):
        assert out.shape == (m,)


# -- checking scores against ground truth ----------------------------------------------------------


def _constant(values: List[float]) -> bool:
    return len(set(values)) <= 1


@given(100, data=st.data())
def test_evaluation(data):
    """weighted_tau and evaluate_scores: finite, or NaN exactly where a sequence is constant (as scipy), or a
    clear error."""
    CASES["examples"] += 1
    n = data.draw(st.integers(0, 8))
    pick = st.sampled_from([0.0, 1.0, 1.0, 2.5, -3.0, 7.0, 1e-9, 1e9])
    scores = data.draw(st.lists(pick, min_size=n, max_size=n))
    truth = data.draw(st.lists(pick, min_size=n, max_size=n + data.draw(st.sampled_from([0, 0, 0, 1]))))
    undefined = _constant(scores) or _constant(truth)
    what = f"weighted_tau({scores}, {truth})"
    before = (list(scores), list(truth))
    CASES["calls"] += 1
    try:
        tau = torch_logme.weighted_tau(scores, truth)
    except (ValueError, TypeError) as err:
        CASES[type(err).__name__] += 1
        assert len(scores) != len(truth) or len(scores) < 2, f"{what} raised {err!r}"
    else:
        assert math.isfinite(tau) or (undefined and math.isnan(tau)), f"{what} = {tau}"
        CASES["finite" if math.isfinite(tau) else "nan (constant input)"] += 1
    assert (scores, truth) == before
    if len(scores) == len(truth) and n >= 2:
        by_model = {f"m{i}": {"logme": v, "other": -v} for i, v in enumerate(scores)}
        accuracy = {f"m{i}": v for i, v in enumerate(truth)}
        out = check(f"evaluate_scores({by_model}, {accuracy})",
                    lambda: torch_logme.evaluate_scores(by_model, accuracy).to_dict(), (by_model, accuracy))
        assert not isinstance(out, BaseException), out


# -- rank_models over candidate models ---------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self, d: int, width: int, c: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = torch.nn.Linear(d, width)
        self.head = torch.nn.Linear(width, c)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@given(30, data=st.data())
def test_rank_candidate_models(data):
    """rank_models over 1 to 2 tiny models and any subset of the feature scores: finite or a clear error."""
    CASES["examples"] += 1
    part = data.draw(features(max_n=30, max_d=6, clean=10))
    if not isinstance(part.x, torch.Tensor) or part.x.dim() != 2 or not part.x.is_floating_point():
        return
    x = part.x.to(torch.float32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    y = torch.from_numpy(_labels(data.draw, x.shape[0], data.draw(st.integers(1, 4)), rng, huge=0))
    size = data.draw(st.integers(1, 16))
    batches = [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]
    watched = tuple(t for batch in batches for t in batch)
    feature_scores = [n for n in NAMES if SCORES[n].input == "features"]
    names = data.draw(st.lists(st.sampled_from(feature_scores), min_size=1, max_size=3, unique=True))
    models = {f"m{i}": _Tiny(x.shape[1], data.draw(st.integers(1, 5)), 3, i) for i in range(data.draw(
        st.integers(1, 2)))}
    layers = data.draw(st.sampled_from([None, ["body"], ["body", "head"], "output"]))
    what = f"rank_models(<{len(models)} models>, layers={layers}, scores={names})"
    out = check(what, lambda: rank_models(models, batches, names, layers=layers, progress=False), watched,
                bad=part.bad)
    if isinstance(out, Ranking):
        assert sorted(out.models) == sorted(models)


def test_every_public_callable_is_covered():
    """Every public name that takes data is one of the entry points above (a new one needs a test here)."""
    covered = {"logme", "LogME", "rank_models", "relabel", "accumulator", "nce", "weighted_tau", "evaluate_scores"}
    covered |= {spec.combine.__name__ for spec in SCORES.values() if spec.combine is not None}
    # Result types, made only by the functions above.
    covered |= {"Evaluation", "ModelRanking"}
    covered |= {spec.fn.__name__ for spec in SCORES.values()}
    covered |= {spec.accumulator_cls.__name__ for spec in SCORES.values() if spec.accumulator_cls is not None}
    data_free = {"extension_available", "Ranking", "ScoreSpec", "SCORES", "__version__"}
    public = set(torch_logme.__all__) - data_free
    assert public <= covered, f"public names without property tests: {sorted(public - covered)}"
