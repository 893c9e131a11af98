"""Tests of the numpy reference (torch_logme.reference) against brute force.

The reference is the oracle of every other test, so it is checked here
against an independent, deliberately naive evaluation of the same published
iterations: dense solves with F^T F + t I and slogdet, no SVD, no spectral
shortcuts.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from torch_logme import reference as ref

EPS = 1e-5
SHAPES = [(40, 10), (10, 30), (15, 15)]  # N > D, N < D, N == D


def _data(n: int, d: int, regression: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features [N, D]; labels [N] in 0..2, or 2 regression targets [N, 2]."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    if regression:
        w = rng.normal(size=(d, 2))
        return f, f @ w + 0.5 * rng.normal(size=(n, 2))
    # Labels that depend on the features, so the fixed point has signal to find.
    y = np.argmax(f @ rng.normal(size=(d, 3)) + rng.normal(size=(n, 3)), axis=1)
    y[:3] = [0, 1, 2]  # every class present
    return f, y


def _columns(y: np.ndarray, regression: bool) -> np.ndarray:
    if regression:
        return np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.eye(int(y.max()) + 1)[y]


def _brute_fixed_point(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """JMLR iteration with dense algebra; returns alpha, beta, correct evidence / N, m."""
    n, d = f.shape
    g = f.T @ f
    b = f.T @ y
    alpha = beta = 1.0
    for _ in range(11):
        t = alpha / beta
        a_t = g + t * np.eye(d)
        m = np.linalg.solve(a_t, b)  # beta (alpha I + beta G)^-1 F^T y
        gamma = np.trace(np.linalg.solve(a_t, g))
        m2 = m @ m
        res2 = np.sum((y - f @ m) ** 2)
        alpha = gamma / (m2 + EPS)
        beta = (n - gamma) / (res2 + EPS)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * g)[1]
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - logdet / 2
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return alpha, beta, ev / n, m


def _brute_icml(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """ICML 2021 iteration with dense algebra; returns alpha, beta, evidence / N, m."""
    n, d = f.shape
    g = f.T @ f
    b = f.T @ y
    alpha = beta = lam = 1.0
    for _ in range(11):
        gamma = np.trace(np.linalg.solve(g + lam * np.eye(d), g))
        m = beta * np.linalg.solve(alpha * np.eye(d) + beta * g, b)
        alpha_de = m @ m
        alpha = gamma / (alpha_de + EPS)
        beta_de = np.sum((y - f @ m) ** 2)
        beta = (n - gamma) / (beta_de + EPS)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 0.01:
            break
        lam = new_lam
    logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * g)[1]
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - logdet / 2
          - beta / 2 * (beta_de + EPS) - alpha / 2 * (alpha_de + EPS)
          - n / 2 * math.log(2 * math.pi))
    return alpha, beta, ev / n, m


@pytest.mark.parametrize("method", ref.METHODS)
@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_brute_force(shape, regression, method):
    f, y = _data(*shape, regression)
    est = ref.LogME(regression=regression, method=method, use_numba=False)
    score = est.fit(f, y)
    cols = _columns(y, regression)
    brute = _brute_fixed_point if method == "fixed_point" else _brute_icml
    expected = [brute(f, cols[:, i]) for i in range(cols.shape[1])]
    alphas, betas, evs, ms = (np.array(v) for v in zip(*expected))
    assert est.num_dim == cols.shape[1]
    # When N <= D the fit nearly interpolates y, so beta = (N - gamma) /
    # (||y - F m||^2 + 1e-5) divides by a residual far below ||y||^2: any
    # float64 evaluation of it (the explicit one here, the published
    # y^T y - ||x||^2 in the reference) cancels, and beta and m agree only to
    # ~1e-8 (measured up to 4e-8 over 20 seeds). alpha and the evidence do not
    # feel it.
    rtol_ill = 1e-8 if shape[0] > shape[1] else 1e-6
    np.testing.assert_allclose(est.alphas, alphas, rtol=1e-8)
    np.testing.assert_allclose(est.betas, betas, rtol=rtol_ill)
    np.testing.assert_allclose(est.evidences, evs, rtol=1e-8)
    np.testing.assert_allclose(est.ms, ms, rtol=rtol_ill, atol=1e-10 * np.abs(ms).max())
    assert score == pytest.approx(evs.mean(), rel=1e-8)


@pytest.mark.parametrize("regression", [False, True])
def test_fixed_point_converged(regression):
    """One more update from the reported (alpha, beta) barely moves t = alpha / beta.

    Only for N > D: with N <= D the published cap of 11 updates often stops
    the iteration well before convergence (t still moving by several percent
    per step), which the brute-force comparison above reproduces.
    """
    f, y = _data(40, 10, regression)
    est = ref.LogME(regression=regression, use_numba=False)
    est.fit(f, y)
    cols = _columns(y, regression)
    n, d = f.shape
    g = f.T @ f
    for i in range(cols.shape[1]):
        t = est.alphas[i] / est.betas[i]
        a_t = g + t * np.eye(d)
        m = np.linalg.solve(a_t, f.T @ cols[:, i])
        gamma = np.trace(np.linalg.solve(a_t, g))
        res2 = np.sum((cols[:, i] - f @ m) ** 2)
        t_next = (gamma / (m @ m + EPS)) / ((n - gamma) / (res2 + EPS))
        assert abs(t_next - t) / t <= 1e-2


@pytest.mark.parametrize("regression", [False, True])
def test_legacy_evidence_n_less_than_d(regression):
    """Published code drops (D - N) zero eigenvalues, each worth log(alpha)."""
    n, d = 10, 30
    f, y = _data(n, d, regression, seed=3)
    new = ref.LogME(regression=regression, use_numba=False)
    old = ref.LogME(regression=regression, legacy_evidence=True, use_numba=False)
    new.fit(f, y)
    old.fit(f, y)
    np.testing.assert_array_equal(new.alphas, old.alphas)
    np.testing.assert_array_equal(new.betas, old.betas)
    np.testing.assert_array_equal(new.ms, old.ms)
    np.testing.assert_allclose(old.evidences - new.evidences,
                               (d - n) / 2 * np.log(new.alphas) / n, rtol=1e-10)


@pytest.mark.parametrize("method", ref.METHODS)
def test_legacy_evidence_full_rank_unchanged(method):
    f, y = _data(40, 10, regression=False, seed=4)
    new = ref.LogME(method=method, use_numba=False)
    old = ref.LogME(method=method, legacy_evidence=True, use_numba=False)
    assert new.fit(f, y) == old.fit(f, y)
    np.testing.assert_array_equal(new.evidences, old.evidences)


def test_legacy_evidence_ignored_by_icml():
    f, y = _data(10, 30, regression=False, seed=5)
    new = ref.LogME(method="icml", use_numba=False)
    old = ref.LogME(method="icml", legacy_evidence=True, use_numba=False)
    np.testing.assert_array_equal(new.fit(f, y), old.fit(f, y))


@pytest.mark.parametrize("method", ref.METHODS)
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_numba_matches_python(shape, legacy, method):
    pytest.importorskip("numba")
    if not ref.NUMBA_AVAILABLE:
        pytest.skip("numba is installed but not usable (needs SciPy)")
    for regression in (False, True):
        f, y = _data(*shape, regression, seed=6)
        py = ref.LogME(regression, method, legacy, use_numba=False)
        nb = ref.LogME(regression, method, legacy, use_numba=True)
        assert nb.fit(f, y) == pytest.approx(py.fit(f, y), rel=1e-12, abs=1e-12)
        for name in ("alphas", "betas", "evidences", "ms"):
            a, b = getattr(nb, name), getattr(py, name)
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_use_numba_true_without_numba(monkeypatch):
    monkeypatch.setattr(ref, "NUMBA_AVAILABLE", False)
    with pytest.raises(ImportError, match="numba"):
        ref.LogME(use_numba=True)
    assert ref.LogME().use_numba is False


@pytest.mark.parametrize("method", ref.METHODS)
def test_absent_class_gets_a_column(method):
    rng = np.random.default_rng(7)
    f = rng.normal(size=(30, 5))
    y = np.where(rng.random(30) < 0.5, 0, 2)
    est = ref.LogME(method=method, use_numba=False)
    score = est.fit(f, y)
    assert est.num_dim == 3
    assert est.alphas.shape == est.betas.shape == est.evidences.shape == (3,)
    assert est.ms.shape == (3, 5)
    assert np.all(np.isfinite(est.evidences)) and math.isfinite(score)
    np.testing.assert_array_equal(est.ms[1], 0.0)


def test_single_class():
    f, _ = _data(20, 4, regression=False)
    est = ref.LogME(use_numba=False)
    assert math.isfinite(est.fit(f, np.zeros(20, dtype=int)))
    assert est.num_dim == 1 and est.ms.shape == (1, 4)


def test_predict_shapes_and_targets():
    f, y = _data(40, 10, regression=False)
    est = ref.LogME(use_numba=False)
    est.fit(f.astype(np.float32), y)
    pred = est.predict(f[:7])
    assert pred.shape == (7,) and np.issubdtype(pred.dtype, np.integer)
    np.testing.assert_array_equal(pred, np.argmax(f[:7] @ est.ms.T, axis=1))

    f, y = _data(40, 10, regression=True)
    est = ref.LogME(regression=True, use_numba=False)
    est.fit(f, y)
    assert est.num_dim == 2 and est.predict(f[:7]).shape == (7, 2)
    est1 = ref.LogME(regression=True, use_numba=False)
    est1.fit(f, y[:, 0])  # 1-D targets are one column
    assert est1.num_dim == 1 and est1.predict(f[:7]).shape == (7, 1)
    np.testing.assert_allclose(est1.evidences, est.evidences[:1], rtol=1e-12)


def test_refit_warns_and_resets():
    f, y = _data(40, 10, regression=False)
    est = ref.LogME(use_numba=False)
    first = est.fit(f, y)
    with pytest.warns(UserWarning, match="re-fitting for new data"):
        second = est.fit(f, y)
    assert first == second and est.fitted and est.num_dim == 3
    est.reset()
    assert not est.fitted and est.num_dim == 0
    with pytest.raises(RuntimeError):
        est.predict(f)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        ref.LogME(method="newton")


def test_no_torch_import():
    """The oracle must stay independent of torch and of the package under test."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    assert not names & {"torch", "torch_logme", "."}
