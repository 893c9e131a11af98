"""LEEP, NCE, H-scores, TransRate and GBC against their numpy references, on every device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_logme import gbc, h_score, leep, logme, nce, reference, regularized_h_score, transrate

from conftest import make_features

RTOL = 1e-9  # parity with the float64 references
ATOL = 1e-12  # for scores that are 0 up to round-off (one class, tiny features)

FEATURE_SCORES = {
    "h_score": (h_score, reference.h_score),
    "regularized_h_score": (regularized_h_score, reference.regularized_h_score),
    "transrate": (transrate, reference.transrate),
    "gbc": (gbc, reference.gbc),
}


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    actual = float(actual.detach().cpu().double()) if isinstance(actual, torch.Tensor) else float(actual)
    assert abs(actual - expected) <= atol + rtol * abs(expected), f"{actual!r} vs reference {expected!r}"


def _empty_id(seed):
    f, y = make_features(200, 12, 4, seed=seed)
    return f, np.where(y == 2, 4, y)  # ids 0, 1, 3, 4: id 2 never occurs


def _rank_deficient(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 200)
    f = rng.standard_normal((200, 4)) @ rng.standard_normal((4, 16))  # rank 4 of 16
    f[:, :8] += 0.5 * y[:, None]  # still rank <= 5
    return f, y


def _badly_scaled(seed):
    f, y = make_features(300, 16, 4, seed=seed)
    return f * np.logspace(-3, 3, 16), y  # columns spread over six decades


def _offset(seed):
    f, y = make_features(300, 16, 4, seed=seed)
    f = f + 1e3  # far from 0: covariances from sums would cancel without centring
    f[:, 2] = 0.1  # a constant column
    return f, y


CASES = {
    "N>D": lambda s: make_features(300, 20, 4, seed=s),
    "N=D": lambda s: make_features(40, 40, 3, seed=s),
    "N<D": lambda s: make_features(25, 60, 4, seed=s),
    "D >= 256": lambda s: make_features(500, 300, 3, seed=s),  # the CPU Gram keeps its upper triangle only
    "one class": lambda s: make_features(100, 8, 1, seed=s),
    "empty class id": _empty_id,
    "rank-deficient": _rank_deficient,
    "badly scaled": _badly_scaled,
    "offset + constant column": _offset,
    "tiny scale": lambda s: (make_features(150, 10, 3, seed=s)[0] * 1e-6, make_features(150, 10, 3, seed=s)[1]),
    "huge scale": lambda s: (make_features(150, 10, 3, seed=s)[0] * 1e6, make_features(150, 10, 3, seed=s)[1]),
}


@pytest.mark.parametrize("case", CASES.keys())
@pytest.mark.parametrize("score", FEATURE_SCORES.keys())
def test_feature_scores_match_reference(device, score, case):
    fn, ref = FEATURE_SCORES[score]
    f, y = CASES[case](len(case))
    out = fn(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    assert out.dim() == 0 and out.dtype == torch.float64 and out.device.type == device
    assert_close(out, ref(f, y))


@pytest.mark.parametrize("score", FEATURE_SCORES.keys())
@pytest.mark.parametrize("shape", [(120, 10), (20, 30)], ids=["N>D", "N<D"])
def test_numpy_and_float32_inputs(device, score, shape):
    fn, ref = FEATURE_SCORES[score]
    f, y = make_features(*shape, 3, seed=11)
    f32 = torch.from_numpy(f).float()
    expected = ref(f32.double().numpy(), y)  # the reference sees the same rounded values
    assert_close(fn(f32.to(device), torch.from_numpy(y).to(device)), expected)
    if device == "cpu":
        assert_close(fn(f32.numpy(), y), expected)
        assert_close(fn(f32.numpy(), y.astype(np.float32)), expected)  # integral float labels


@pytest.mark.parametrize("score", FEATURE_SCORES.keys())
def test_float32_compute(device, score):
    fn, _ = FEATURE_SCORES[score]
    f, y = make_features(400, 16, 4, seed=12)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    low = fn(ft, yt, dtype=torch.float32)
    assert low.dtype == torch.float32
    assert_close(low, float(fn(ft, yt)), rtol=1e-4, atol=1e-6)


def test_fresh_random_inputs(device):
    # New draws every run: the parity must not hinge on particular data.
    rng = np.random.default_rng()
    for _ in range(2):
        n, d, c = int(rng.integers(20, 200)), int(rng.integers(2, 40)), int(rng.integers(1, 6))
        f, y = make_features(n, d, c, seed=int(rng.integers(1 << 30)))
        for fn, ref in FEATURE_SCORES.values():
            assert_close(fn(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)), ref(f, y))
        probs = rng.dirichlet(np.full(7, 0.3), n)
        assert_close(leep(torch.from_numpy(probs).to(device), torch.from_numpy(y).to(device)), reference.leep(probs, y))
        hard = probs.argmax(1)
        assert_close(nce(torch.from_numpy(hard).to(device), torch.from_numpy(y).to(device)), reference.nce(hard, y))


def test_options_pass_through(device):
    f, y = make_features(200, 10, 3, seed=13)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    assert_close(transrate(ft, yt, eps=1e-2), reference.transrate(f, y, eps=1e-2))
    assert_close(gbc(ft, yt, min_variance=0.5), reference.gbc(f, y, min_variance=0.5))
    assert_close(h_score(ft, yt, rcond=1e-3), reference.h_score(f, y, rcond=1e-3))
    assert float(transrate(ft, yt, eps=1e-2)) != pytest.approx(float(transrate(ft, yt)))


def test_known_values():
    # Classes far apart: H-scores reach C - 1, GBC reaches 0, NCE and LEEP reach 0 with perfect sources.
    y = np.repeat(np.arange(3), 50)
    f = np.random.default_rng(0).standard_normal((150, 4)) * 1e-3 + 100.0 * np.eye(3, 4)[y]
    assert float(h_score(f, y)) == pytest.approx(2.0, abs=1e-6)
    assert float(gbc(f, y)) == pytest.approx(0.0, abs=1e-12)
    assert float(nce(y, y)) == 0.0
    assert float(leep(np.eye(3)[y], y)) == pytest.approx(0.0, abs=1e-15)
    # A source that knows nothing: NCE = -H(Y), LEEP = log of the label frequencies.
    assert float(nce(np.zeros(150, dtype=int), y)) == pytest.approx(-np.log(3))
    assert float(leep(np.full((150, 5), 0.2), y)) == pytest.approx(-np.log(3))
    # TransRate is a mutual-information estimate: >= 0, and 0 for one class.
    assert float(transrate(f, y)) > 0
    assert float(transrate(f, np.zeros(150, dtype=int))) == pytest.approx(0.0, abs=1e-9)


def test_h_scores_invariances():
    f, y = make_features(200, 12, 4, seed=14)
    rng = np.random.default_rng(1)
    mixed = f @ rng.standard_normal((12, 12)) + 5.0  # invertible linear map and a shift
    assert float(h_score(mixed, y)) == pytest.approx(float(h_score(f, y)), rel=1e-9)
    # Relabelling the classes changes nothing.
    perm = np.array([3, 0, 2, 1])
    for fn in (h_score, regularized_h_score, transrate, gbc):
        assert float(fn(f, perm[y])) == pytest.approx(float(fn(f, y)), rel=1e-12)


# -- LEEP and NCE ------------------------------------------------------------------


def _probs(n, cs, seed, zero_class=False):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(cs, 0.5), n)
    if zero_class:  # a source class that never gets probability mass
        p[:, 1] = 0.0
        p /= p.sum(1, keepdims=True)
    return p


LABEL_CASES = {
    "basic": (300, 6, 4),
    "one target class": (100, 5, 1),
    "one source class": (100, 1, 3),
    "many classes": (400, 50, 30),
}


@pytest.mark.parametrize("case", LABEL_CASES.keys())
def test_leep_nce_match_reference(device, case):
    n, cs, ct = LABEL_CASES[case]
    rng = np.random.default_rng(len(case))
    y = rng.integers(0, ct, n)
    p = _probs(n, cs, seed=len(case))
    out = leep(torch.from_numpy(p).to(device), torch.from_numpy(y).to(device))
    assert out.dim() == 0 and out.dtype == torch.float64 and out.device.type == device
    assert_close(out, reference.leep(p, y))
    z = rng.integers(0, cs, n)
    assert_close(nce(torch.from_numpy(z).to(device), torch.from_numpy(y).to(device)), reference.nce(z, y))


def test_leep_nce_edge_cases(device):
    y = np.random.default_rng(2).integers(0, 4, 200)
    y = np.where(y == 1, 5, y)  # empty target id 1 (and ids up to 5)
    p = _probs(200, 6, seed=3, zero_class=True)
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    assert_close(leep(to(p), to(y)), reference.leep(p, y))
    assert_close(leep(to(p.astype(np.float32)), to(y)), reference.leep(p.astype(np.float32).astype(np.float64), y))
    z = np.where(p.argmax(1) == 2, 7, p.argmax(1))  # empty source ids
    assert_close(nce(to(z), to(y)), reference.nce(z, y))
    assert_close(nce(z, y.astype(np.float64)), reference.nce(z, y))
    assert_close(nce(z.astype(bool), y), reference.nce(z.astype(bool), y))
    assert float(leep(to(p), to(y), dtype=torch.float32)) == pytest.approx(reference.leep(p, y), rel=1e-5)


# -- bad input: the same errors as logme -------------------------------------------

F, Y = make_features(20, 4, 3, seed=0)


def _with(a, index, value):
    a = a.astype(np.float64).copy()
    a[index] = value
    return a


# (features, labels, keywords, exception, message fragment): each also fails logme alike.
BAD_FEATURES = {
    "features 1-D": (F[:, 0], Y, {}, ValueError, "2-D"),
    "length mismatch": (F, Y[:-1], {}, ValueError, "disagree on N"),
    "one sample": (F[:1], Y[:1], {}, ValueError, "at least 2 samples"),
    "no feature dims": (F[:, :0], Y, {}, ValueError, "D = 0"),
    "NaN features": (_with(F, (3, 1), np.nan), Y, {}, ValueError, "NaN or Inf"),
    "Inf features": (_with(F, (0, 0), np.inf), Y, {}, ValueError, "NaN or Inf"),
    "NaN labels": (F, _with(Y, 2, np.nan), {}, ValueError, "NaN or Inf"),
    "negative labels": (F, Y - 1, {}, ValueError, "non-negative"),
    "non-integer labels": (F, Y + 0.5, {}, ValueError, "must be integers"),
    "2-D labels": (F, np.stack([Y, Y], 1), {}, ValueError, "1-D"),
    "all-zero features": (np.zeros((20, 4)), Y, {}, ValueError, "all zero"),
    "string labels": (F, np.array(["a"] * 20), {}, TypeError, "real numbers"),
    "complex features": (F.astype(np.complex128), Y, {}, TypeError, "real numbers"),
    "list features": (F.tolist(), Y, {}, TypeError, "torch.Tensor or numpy.ndarray"),
    "bad dtype": (F, Y, {"dtype": torch.float16}, ValueError, "dtype must be"),
    "bad device": (F, Y, {"device": "not-a-device"}, ValueError, "device"),
}


@pytest.mark.parametrize("case", BAD_FEATURES.keys())
@pytest.mark.parametrize("score", FEATURE_SCORES.keys())
def test_feature_scores_reject_like_logme(score, case):
    f, y, kw, exc, fragment = BAD_FEATURES[case]
    with pytest.raises(exc, match=fragment):
        logme(f, y, **kw)
    with pytest.raises(exc, match=fragment):
        FEATURE_SCORES[score][0](f, y, **kw)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: transrate(F, Y, eps=0.0), "eps must be"),
        (lambda: transrate(F, Y, eps=float("nan")), "eps must be"),
        (lambda: gbc(F, Y, min_variance=-1.0), "min_variance must be"),
        (lambda: h_score(F, Y, rcond=2.0), "rcond must be"),
        (lambda: regularized_h_score(F, Y, rcond="x"), "rcond must be"),
    ],
)
def test_bad_score_options(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


P = _probs(20, 5, seed=1)

BAD_PROBS = {
    "probs 1-D": (P[:, 0], Y, ValueError, "2-D"),
    "length mismatch": (P, Y[:-1], ValueError, "disagree on N"),
    "one sample": (P[:1], Y[:1], ValueError, "at least 2 samples"),
    "NaN probs": (_with(P, (1, 1), np.nan), Y, ValueError, "NaN or Inf"),
    "negative probs": (_with(P, (1, 1), -0.1), Y, ValueError, "negative"),
    "unnormalised": (P * 3.0, Y, ValueError, "sum to 1"),
    "logits": (np.log(P), Y, ValueError, "probabilities"),
    "negative labels": (P, Y - 1, ValueError, "non-negative"),
    "non-integer labels": (P, Y + 0.5, ValueError, "must be integers"),
    "NaN labels": (P, _with(Y, 0, np.nan), ValueError, "NaN or Inf"),
    "2-D labels": (P, np.stack([Y, Y], 1), ValueError, "1-D"),
    "complex probs": (P.astype(np.complex128), Y, TypeError, "real numbers"),
    "list probs": (P.tolist(), Y, TypeError, "torch.Tensor or numpy.ndarray"),
}


@pytest.mark.parametrize("case", BAD_PROBS.keys())
def test_leep_rejects(case):
    p, y, exc, fragment = BAD_PROBS[case]
    with pytest.raises(exc, match=fragment):
        leep(p, y)


BAD_LABEL_PAIRS = {
    "length mismatch": (Y, Y[:-1], ValueError, "disagree on N"),
    "one sample": (Y[:1], Y[:1], ValueError, "at least 2 samples"),
    "negative source": (Y - 1, Y, ValueError, "non-negative"),
    "negative target": (Y, Y - 1, ValueError, "non-negative"),
    "non-integer": (Y + 0.5, Y, ValueError, "must be integers"),
    "NaN": (Y, _with(Y, 0, np.nan), ValueError, "NaN or Inf"),
    "2-D source": (np.stack([Y, Y], 1), Y, ValueError, "1-D"),
    "scalar source": (np.array(3), Y, ValueError, "1-D"),
    "probabilities given": (P, Y, ValueError, "1-D"),
    "strings": (np.array(["a"] * 20), Y, TypeError, "real numbers"),
}


@pytest.mark.parametrize("case", BAD_LABEL_PAIRS.keys())
def test_nce_rejects(case):
    s, t, exc, fragment = BAD_LABEL_PAIRS[case]
    with pytest.raises(exc, match=fragment):
        nce(s, t)


def test_inputs_not_modified(device):
    f, y = make_features(60, 6, 3, seed=15)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    before = ft.clone(), yt.clone()
    for fn, _ in FEATURE_SCORES.values():
        fn(ft, yt)
    p = torch.from_numpy(_probs(60, 4, seed=2)).to(device)
    p_before = p.clone()
    leep(p, yt)
    nce(yt, yt)
    assert torch.equal(ft, before[0]) and torch.equal(yt, before[1]) and torch.equal(p, p_before)


def test_no_gradient():
    f = torch.from_numpy(make_features(50, 5, 2, seed=16)[0]).requires_grad_()
    y = torch.from_numpy(make_features(50, 5, 2, seed=16)[1])
    for fn, _ in FEATURE_SCORES.values():
        assert not fn(f, y).requires_grad
