"""Issue 10 for the other scores: never a silent NaN, exact on real, offset and badly scaled features.

H-score, the shrinkage H-score, TransRate and GBC are shift-invariant; the
H-scores are scale-invariant too, and TransRate (eps) and GBC (the variance
floor) scale with their constant: TransRate(s F, eps) = TransRate(F, eps / s^2).
Every score, functional or streamed, gives a finite value or a ValueError
that names the problem, for any finite features of magnitude 1e-150 to
1e150, and agrees with the float64 numpy reference wherever that is finite
and the problem is well conditioned. scikit-learn (its bundled data sets)
and hypothesis are test-only dependencies.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from torch_logme import (
    GBCAccumulator,
    HScoreAccumulator,
    RegularizedHScoreAccumulator,
    TransRateAccumulator,
    gbc,
    h_score,
    leep,
    nce,
    reference,
    regularized_h_score,
    scores,
    transrate,
)

from conftest import batches, make_features

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCORES = {
    "h_score": (h_score, HScoreAccumulator, reference.h_score),
    "regularized_h_score": (regularized_h_score, RegularizedHScoreAccumulator, reference.regularized_h_score),
    "transrate": (transrate, TransRateAccumulator, reference.transrate),
    "gbc": (gbc, GBCAccumulator, reference.gbc),
}
SCALE_INVARIANT = ("h_score", "regularized_h_score")
DATA_SETS = ("digits", "wine", "breast_cancer", "iris")


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def close(a, b, rtol, atol=0.0) -> bool:
    return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))


def streamed(cls, f, y, sizes=(37, 100), **kw):
    """The accumulator's score: two accumulators fed alternate batches, one saved and loaded, merged."""
    n, d = f.shape
    first, second = cls(d, **kw), cls(d, **kw)
    for i, rows in enumerate(batches(n, list(sizes))):
        (first if i % 2 == 0 else second).update(f[rows], y[rows])
    buffer = io.BytesIO()
    torch.save(second.state_dict(), buffer)
    restored = cls(d, **kw)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    first.merge(restored)
    return first.compute()


@pytest.fixture(scope="module", params=DATA_SETS)
def data_set(request):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, f"load_{request.param}")(return_X_y=True)
    return request.param, x.astype(np.float64), y.astype(np.int64)


# -- real data: scikit-learn's digits, wine, breast cancer and iris -------------------


@pytest.mark.parametrize("score", SCORES.keys())
def test_real_data_functional_reference_streamed(data_set, score, device):
    _, f, y = data_set
    fn, cls, ref = SCORES[score]
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    value = fn(ft, yt)
    assert rel(value, ref(f, y)) <= 1e-9
    assert rel(streamed(cls, ft, yt), value) <= 1e-10
    # float32 compute: breast cancer's H-score is the worst, its correlation matrix has cond ~1e7.
    assert rel(fn(ft, yt, dtype=torch.float32), value) <= 1e-2


@pytest.mark.parametrize("score", SCORES.keys())
def test_real_data_offset_by_1e7(data_set, score):
    # The issue's example: h_score(F + 1e7) was 0.0. G - 1e7 is an exact translation of G
    # (Sterbenz), so the scores of G and G - 1e7 must agree to round-off; F + 1e7 itself is F
    # rounded to ulp(1e7) ~ 2e-9, which moves the scores of the non-integer data sets by up to ~1e-9.
    name, f, y = data_set
    fn, cls, ref = SCORES[score]
    g = f + 1e7
    value = fn(g, y)
    assert rel(value, fn(g - 1e7, y)) <= 1e-11
    assert rel(streamed(cls, g, y), value) <= 1e-10
    assert rel(value, ref(f, y)) <= (1e-12 if name == "digits" else 1e-8)  # digits: integers, exact
    if score == "transrate":
        assert float(streamed(cls, g, y)) > 0


# -- offsets, scales and float32 --------------------------------------------------


def _offset_problem(seed=0, n=300, d=12, c=4):
    f, y = make_features(n, d, c, seed=seed)
    rng = np.random.default_rng(seed + 1)
    offsets = rng.choice([-1.0, 1.0], d) * 10.0 ** rng.uniform(-1, 8, d)
    return f, y, offsets


@pytest.mark.parametrize("score", SCORES.keys())
@pytest.mark.parametrize("offset", ["1e7", "per-column up to 1e8"])
def test_shift_invariance_functional_and_streamed(score, offset, device):
    f, y, offsets = _offset_problem()
    g = f + (1e7 if offset == "1e7" else offsets)
    h = g - (1e7 if offset == "1e7" else offsets)  # the same points, translated exactly
    g, h, y = (torch.from_numpy(a).to(device) for a in (g, h, y))
    fn, cls, _ = SCORES[score]
    value = fn(h, y)
    assert rel(fn(g, y), value) <= 1e-9
    assert rel(streamed(cls, g, y), value) <= 1e-9
    assert rel(streamed(cls, g, y, sizes=(1, 7, 64)), value) <= 1e-9
    # Accumulators whose first batches give different shifts: merged, one is recentred.
    a, b = cls(f.shape[1]), cls(f.shape[1])
    a.update(g[:100], y[:100])
    b.update(g[100:][y[100:] == 1], y[100:][y[100:] == 1])  # one class first: a shift far from a's
    b.update(g[100:][y[100:] != 1], y[100:][y[100:] != 1])
    assert not torch.equal(a.shift, b.shift)
    a.merge(b)
    assert rel(a.compute(), value) <= 1e-9


@pytest.mark.parametrize("score", SCORES.keys())
@pytest.mark.parametrize("exponent", [-150, -100, -30, 0, 30, 100, 150])
def test_any_scale(score, exponent):
    # H-scores are scale-invariant; TransRate(s F, eps) = TransRate(F, eps / s^2) and
    # GBC(s F, v) = GBC(F, v / s^2). With s a power of two both sides hold the same digits.
    f, y, offsets = _offset_problem(seed=3, n=200, d=10)
    fn, cls, _ = SCORES[score]
    k = round(exponent * math.log2(10))
    for data, rounding in ((f, 1e-12), (f + offsets, 1e-9)):
        scaled = np.ldexp(data, k)
        kw, unit_kw = {}, {}
        if score == "transrate":
            kw, unit_kw = {"eps": 1e-4}, {"eps": math.ldexp(1e-4, -2 * k)}
        elif score == "gbc":
            kw, unit_kw = {"min_variance": 1e-4}, {"min_variance": math.ldexp(1e-4, -2 * k)}
        value = fn(scaled, y, **kw)
        assert math.isfinite(float(value))
        assert rel(value, fn(data, y, **unit_kw)) <= 1e-12
        assert rel(streamed(cls, scaled, y, **kw), value) <= 1e-10
        if score in SCALE_INVARIANT:
            # Not a power of two: the product rounds, by up to 1e-8 of the spread next to an offset of 1e8.
            assert rel(fn(data * 10.0 ** exponent, y), value) <= rounding
            assert rel(fn(scaled, y, dtype=torch.float32), value) <= 1e-4


def test_transrate_and_gbc_name_the_magnitude():
    f, y = make_features(100, 6, 3, seed=4)
    with pytest.raises(ValueError, match=r"TransRate.*1\.\de\+160.*raise eps"):
        transrate(f * 1e160, y)
    acc = TransRateAccumulator(6)
    acc.update(f * 1e160, y)
    with pytest.raises(ValueError, match=r"TransRate.*raise eps"):
        acc.compute()
    # In float32 the floor min_variance / s^2 underflows long before float64's does.
    with pytest.raises(ValueError, match=r"GBC.*e\+150.*min_variance"):
        gbc(f * 1e150, y, dtype=torch.float32)
    acc = GBCAccumulator(6, dtype=torch.float32)
    acc.update(f * 1e150, y)
    with pytest.raises(ValueError, match=r"GBC.*min_variance"):
        acc.compute()
    assert math.isfinite(float(gbc(f * 1e150, y)))  # float64 holds it
    assert math.isfinite(float(gbc(f * 1e-150, y, dtype=torch.float32)))  # a floor far above: -C (C - 1)
    assert float(gbc(f * 1e-150, y, dtype=torch.float32)) == -6.0


def _transrate_svd(f, y, log_eps, cut):
    """(TransRate, the whole data's rate, a round-off bound of Gram-matrix arithmetic) from singular values.

    f: features at about unit scale; log_eps: log of eps in those units (the
    features' scale moves it far outside float64's range). Singular values
    of the centred rows at most cut(s_max, shape) are dropped. A Gram matrix
    holds s^2 to about K eps_machine s_max^2, so a direction's term
    log(1 + s^2 / (n eps)) is known from it to about K eps_machine
    (s_max / s)^2: the bound sums that over the terms, weighted as they are.
    """
    z = f - f.mean(0)
    z = z - z.mean(0)
    tiny = np.finfo(np.float64).eps

    def rate(rows, weight):
        s = np.linalg.svd(rows, compute_uv=False)
        s = s[s > cut(s.max(initial=0.0), rows.shape)]
        bound = weight * (max(rows.shape) * tiny * (s.max(initial=0.0) / s) ** 2).sum()
        return 0.5 * np.logaddexp(0.0, 2 * np.log(s) - math.log(rows.shape[0]) - log_eps).sum(), bound

    whole, bound = rate(z, 1.0)
    score = whole
    for c in np.unique(y):
        value, more = rate(z[y == c], (y == c).mean())
        score, bound = score - (y == c).mean() * value, bound + more
    return score, whole, bound


def _transrate_oracle(f, y, eps=1e-4):
    """(TransRate, whether it is resolvable from Gram matrices, the whole data's rate, round-off bound).

    Gram matrices resolve squared singular values down to about K eps_machine
    times the largest; the problem is resolvable when the directions between
    that and the singular values' own resolution change nothing.
    """
    k = math.frexp(np.abs(f).max())[1]
    z, log_eps = np.ldexp(f, -k), math.log(eps) - 2 * k * math.log(2)  # the same score at unit scale
    tiny = np.finfo(np.float64).eps
    fine, whole, bound = _transrate_svd(z, y, log_eps, lambda s, shape: max(shape) * tiny * s)
    coarse, _, _ = _transrate_svd(z, y, log_eps, lambda s, shape: 10 * math.sqrt(max(shape) * tiny) * s)
    return fine, abs(fine - coarse) <= 1e-10 * (1 + whole), whole, bound


@pytest.mark.parametrize("exponent", [0, 3, 30, 100, 140])
@pytest.mark.parametrize("kind", ["N<D", "duplicated columns", "constant column"])
def test_transrate_rank_deficient_at_scale(kind, exponent):
    # Exactly singular Z^T Z: round-off makes its zero eigenvalues about eps ||A||, which a
    # factorisation of I + A would count as log(1 + eps ||A||) each (tens, at 1e30).
    if kind == "N<D":
        f, y = make_features(30, 50, 3, seed=5)
    else:
        f, y = make_features(300, 12, 3, seed=5)
        if kind == "duplicated columns":
            f[:, 6:] = f[:, :6]
        else:
            f[:, 3] = 0.5
    f = f * 10.0 ** exponent
    expected, resolvable, whole, bound = _transrate_oracle(f, y)
    assert resolvable
    atol = 1e-12 * (1 + whole) + bound
    assert close(transrate(f, y), expected, 1e-9, atol)
    assert close(streamed(TransRateAccumulator, f, y), expected, 1e-9, atol)
    assert close(transrate(f + 1e7 * 10.0 ** exponent, y), expected, 1e-6, atol)


def test_float32_features_at_large_offsets():
    f, y = make_features(400, 10, 4, seed=6)
    g32 = torch.from_numpy(f * 100 + 1e7).float()  # float32 at 1e7: spacing 1, spread 100
    same = g32.double().numpy()
    for name, (fn, cls, ref) in SCORES.items():
        value = fn(g32, y)
        assert rel(value, ref(same, y)) <= 1e-9, name
        assert rel(streamed(cls, g32, torch.from_numpy(y)), value) <= 1e-9, name
        # float32 compute of float64 features: the offset goes before the conversion.
        g = f + 1e7
        assert rel(fn(g, y, dtype=torch.float32), fn(g, y)) <= 1e-4, name


def test_constant_columns_still_dropped():
    f, y = make_features(200, 8, 3, seed=7)
    with_constant = np.concatenate([f, np.full((200, 1), 3.7)], 1) + 1e7
    assert rel(h_score(with_constant, y), h_score(f, y)) <= 1e-9
    assert rel(streamed(HScoreAccumulator, with_constant, y), h_score(f, y)) <= 1e-9
    for data in (with_constant, np.concatenate([f, np.zeros((200, 1))], 1)):
        assert rel(reference.h_score(data, y), h_score(f, y)) <= 1e-9
        assert rel(h_score(data[:6], y[:6]), reference.h_score(data[:6], y[:6])) <= 1e-9  # N < D


# -- the streaming frames -------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES.keys())
def test_recentre_and_rescale_equal_recomputed_sums(score):
    _, cls, _ = SCORES[score]
    f, y = make_features(300, 7, 4, seed=8)
    f = f * 3 + 5
    acc = cls(7)
    acc.update(f[:50], y[:50])
    acc.update(f[50:], y[50:])
    other_shift = acc.shift + torch.linspace(-2.0, 3.0, 7, dtype=torch.float64)
    other_scale = acc.scale * 2.0 ** -3
    for shift, scale in ((other_shift, acc.scale), (acc.shift, other_scale), (other_shift, other_scale)):
        direct = cls(7)
        direct._shift, direct._scale, direct._wide = shift.clone(), scale.clone(), True
        direct.update(f, y)
        acc._target_scale = scale
        try:
            moved = acc._states_at(shift)
        finally:
            acc._target_scale = None
        for name, value in direct.states.items():
            err = (moved[name] - value).abs().max() / value.abs().max().clamp_min(1e-300)
            assert float(err) <= 1e-14, (name, float(err))


@pytest.mark.parametrize("score", SCORES.keys())
def test_merge_state_dict_reset_keep_the_frame(score):
    fn, cls, _ = SCORES[score]
    f, y = make_features(240, 6, 4, seed=9)
    f[120:] *= 4096  # the second accumulator's first batch is larger: a coarser scale
    f = f * 1e100 + 3e100  # outside the band: powers of two scale the sums
    small, large = cls(6), cls(6)
    small.update(f[:120], y[:120])
    large.update(f[120:], y[120:])
    assert not torch.equal(small.scale, large.scale) and not torch.equal(small.shift, large.shift)
    expected = fn(f, y)
    for first, second in ((small, large), (large, small)):
        merged = cls(6)
        merged.load_state_dict(first.state_dict())
        merged.merge(second)
        assert rel(merged.compute(), expected) <= 1e-9
        assert torch.equal(merged.scale, torch.minimum(small.scale, large.scale))
    saved = small.state_dict()
    assert torch.equal(saved["shift"], small.shift) and torch.equal(saved["scale"], small.scale)
    small.reset()
    assert small.shift is None and small.scale is None


@pytest.mark.parametrize("score", SCORES.keys())
def test_checkpoint_without_shift_or_scale(score):
    # Accumulators saved before they had a shift hold sums of the features themselves.
    fn, cls, _ = SCORES[score]
    f, y = make_features(200, 5, 3, seed=10)
    raw = cls(5)
    raw._shift = torch.zeros(5, dtype=torch.float64)
    raw._scale = torch.ones(5, dtype=torch.float64)
    raw._wide = True
    raw.update(f[:120], y[:120])
    old = {k: v for k, v in raw.state_dict().items() if k not in ("shift", "scale", "wide")}
    restored = cls(5)
    restored.load_state_dict(old)
    restored.update(f[120:] + 0.5, y[120:])  # more batches, about the same (zero) shift
    assert rel(restored.compute(), fn(np.concatenate([f[:120], f[120:] + 0.5]), y)) <= 1e-9


def test_issue_accumulator_examples():
    # On F + 1e7 the accumulators gave 0 (H-scores, GBC) and -239.1 (TransRate).
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    for name, (fn, cls, _) in SCORES.items():
        assert rel(streamed(cls, x + 1e7, y), fn(x, y)) <= 1e-10, name


# -- property-based: any shape, scale, offset, dtype and labels ------------------------


MESSAGES = {  # what a ValueError may be about, per score
    "h_score": ("all zero",),
    "regularized_h_score": ("all zero",),
    "transrate": ("all zero", "raise eps", "divide the features"),
    "gbc": ("all zero", "min_variance", "divide the features"),
}


@st.composite
def feature_problems(draw):
    shape = draw(st.sampled_from(["N>D", "N=D", "N<D"]))
    d = draw(st.integers(3 if shape == "N<D" else 2 if shape == "N=D" else 1, 12))
    if shape == "N>D":
        n = draw(st.integers(d + 1, 80))
    else:
        n = d if shape == "N=D" else draw(st.integers(2, d - 1))
    c = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    f, y = make_features(n, d, c, seed=seed)
    labels = draw(st.sampled_from(["ids", "absent ids", "one class"]))
    if labels == "absent ids":
        y = np.array([0, 2, 5, 6])[y]
    elif labels == "one class":
        y = np.full(n, draw(st.integers(0, 3)))
    if d >= 2 and draw(st.booleans()):
        f[:, d - 1] = f[:, 0]  # duplicated column
    if draw(st.booleans()):
        f[:, draw(st.integers(0, d - 1))] = draw(st.sampled_from([0.0, 1.0, -3.5]))  # constant column
    offset = draw(st.sampled_from(["none", "1e7", "per column"]))
    rng = np.random.default_rng(seed)
    offsets = {
        "none": np.zeros(d),
        "1e7": np.full(d, 1e7),
        "per column": rng.choice([-1.0, 1.0], d) * 10.0 ** rng.uniform(-1, 8, d),
    }[offset]
    input_dtype = draw(st.sampled_from([np.float64, np.float32]))
    # float32 holds magnitudes up to 3.4e38: its scales stay well inside.
    exponent = draw(st.integers(-30, 20) if input_dtype == np.float32 else st.integers(-150, 150))
    scale = draw(st.floats(1.0, 10.0)) * 10.0 ** exponent
    compute = draw(st.sampled_from([torch.float64, torch.float32]))
    g = (f * scale + offsets * scale).astype(input_dtype)
    # The same points without the offset: exact in float64 where |offset| >> spread (Sterbenz),
    # and otherwise off by float64 round-off only (float32 values differ exactly in float64).
    h = g.astype(np.float64) - (offsets * scale).astype(input_dtype).astype(np.float64)
    return g, h, y, compute


def _outcome(call):
    try:
        return float(call())
    except ValueError as err:
        return err


def _h_score_bound(f, y) -> float:
    """A round-off bound of the H-scores: they divide by eigenvalues of the correlation matrix.

    With the kept eigenvalues (above 1e-10 of the largest) down to lam_min,
    the pseudo-inverse holds them to about D eps_machine lam_max / lam_min.
    """
    z = f - f.mean(0)
    z = z - z.mean(0)
    sd = np.sqrt((z * z).mean(0))
    live = sd > 0
    if not live.any():
        return 0.0
    z = z[:, live] / sd[live]
    lam = np.linalg.eigvalsh(z.T @ z / len(z))
    kept = lam[lam > 1e-10 * lam.max()]
    return 10 * z.shape[1] * np.finfo(np.float64).eps * kept.max() / kept.min() * max(len(np.unique(y)) - 1, 1)


def _pow2_unit(x: np.ndarray):
    """(x * 2**-k in float64 holding the same digits, k) with max |x * 2**-k| in [0.5, 1)."""
    x = np.asarray(x, dtype=np.float64)
    k = math.frexp(float(np.abs(x).max()))[1] if np.abs(x).max() > 0 else 0
    return np.ldexp(x, -k), k


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=feature_problems())
def test_feature_scores_property(problem):
    g, h, y, compute = problem
    gt, ht, yt = torch.from_numpy(g), torch.from_numpy(h), torch.from_numpy(y)
    before = gt.clone(), yt.clone()
    unit, k = _pow2_unit(g)
    oracle = _transrate_oracle(g.astype(np.float64), y) if np.abs(unit).max() > 0 else (0.0, False, 0.0, 0.0)
    for name, (fn, cls, ref) in SCORES.items():
        value = _outcome(lambda fn=fn: fn(gt, yt, dtype=compute))
        if isinstance(value, ValueError):
            assert any(m in str(value) for m in MESSAGES[name]), (name, str(value))
            continue
        assert math.isfinite(value), name
        if compute != torch.float64:
            continue
        # The float64 reference, on the same digits brought to unit scale (exact: a power of two).
        if name in SCALE_INVARIANT:
            # Near-duplicate columns (float32 rounding of an offset makes them) leave small
            # eigenvalues the pseudo-inverse divides by.
            expected, atol = ref(unit, y), 1e-10 + _h_score_bound(unit, y)
        elif name == "gbc":
            expected, atol = ref(unit, y, min_variance=math.ldexp(1e-4, -2 * k)), 1e-12 * len(np.unique(y)) ** 2
        else:
            expected, _, whole, bound = oracle
            # A difference of coding rates: round-off of the terms, ~1e-12 of the whole data's rate;
            # what Gram matrices cannot resolve of directions of small variance; and for a
            # rank-deficient Z near unit scale, its zero eigenvalues, which one Cholesky
            # factorisation counts as log(1 + round-off) each while that is below RATE_ROUNDOFF.
            atol = 1e-10 * (1 + whole) + 4 * bound + g.shape[1] * scores.RATE_ROUNDOFF[torch.float64]
        if name != "transrate" or oracle[1]:
            assert close(value, expected, 1e-8, atol), (name, value, expected)
            if name == "transrate" and _rounding_negligible(unit, k):  # where log det(I + A) is exact
                assert close(value, ref(g.astype(np.float64), y), 1e-8, atol), (name, "reference")
            assert close(streamed(cls, gt, yt, sizes=(5, 17)), value, 1e-8, atol), name
            shifted = _outcome(lambda fn=fn: fn(ht, yt))
            if not (isinstance(shifted, ValueError) and "all zero" in str(shifted)):  # constant, shifted to 0
                assert close(shifted, value, 1e-8, atol), (name, "shift", shifted, value)
    for name, (_fn, cls, _ref) in SCORES.items():  # every accumulator: a finite score or a clear ValueError
        value = _outcome(lambda cls=cls: streamed(cls, gt, yt, sizes=(5, 17), dtype=compute))
        if isinstance(value, ValueError):
            assert any(m in str(value) for m in MESSAGES[name]), (name, "streamed", str(value))
        else:
            assert math.isfinite(value), (name, "streamed")
    assert torch.equal(gt, before[0]) and torch.equal(yt, before[1])


def _rounding_negligible(unit, k, eps=1e-4) -> bool:
    """Whether eps_machine tr(Z^T Z / (N eps)) < 1e-8 (features 2**k * unit): no rank round-off in logdets."""
    z = unit - unit.mean(0)
    total = float((z * z).mean(0).sum())
    return total == 0 or math.log2(total) + 2 * k - math.log2(eps) < math.log2(1e-8 / np.finfo(np.float64).eps)


@st.composite
def label_problems(draw):
    n = draw(st.integers(2, 60))
    cs, ct = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    concentration = 10.0 ** draw(st.integers(-3, 2))
    probs = rng.dirichlet(np.full(cs, concentration), n)
    if draw(st.booleans()):
        probs = np.maximum(probs, 1e-300)  # subnormal-free but tiny mass everywhere
        probs /= probs.sum(1, keepdims=True)
    y = rng.integers(0, ct, n)
    if draw(st.booleans()):
        y = y * 2  # absent odd ids
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    compute = draw(st.sampled_from([torch.float64, torch.float32]))
    return probs.astype(dtype), y, compute


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(problem=label_problems())
def test_leep_nce_property(problem):
    probs, y, compute = problem
    p, yt = torch.from_numpy(probs), torch.from_numpy(y)
    before = p.clone()
    value = float(leep(p, yt, dtype=compute))
    assert math.isfinite(value) and value <= 1e-6
    hard = probs.argmax(1)
    neg_entropy = float(nce(torch.from_numpy(hard), yt, dtype=compute))
    assert math.isfinite(neg_entropy) and neg_entropy <= 1e-6
    if compute == torch.float64:
        assert close(value, reference.leep(probs.astype(np.float64), y), 1e-9, 1e-12)
        assert close(neg_entropy, reference.nce(hard, y), 1e-9, 1e-12)
    assert torch.equal(p, before)
