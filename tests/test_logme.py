"""LogME against the independent numpy reference, on every device in DEVICES."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torch_logme
from torch_logme import LogME, logme
from torch_logme.reference import LogME as RefLogME

from conftest import DTYPES, make_features

RTOL = 1e-9  # parity with the float64 reference
SHAPES = {"N>D": (300, 40), "N=D": (40, 40), "N<D": (30, 80)}


def reference(f, y, *, regression=False, **options):
    ref = RefLogME(regression=regression, **options)
    score = ref.fit(np.asarray(f, dtype=np.float64), np.asarray(y))
    return score, ref


def assert_close(actual, expected, rtol=RTOL, what="score"):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().cpu().double().numpy()
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.maximum(np.abs(expected), 1e-300)
    err = np.max(np.abs(actual - expected) / scale)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def assert_matches_reference(est, ref, score, ref_score, ms_rtol=1e-7):
    assert_close(score, ref_score)
    assert est.num_dim == ref.num_dim
    assert_close(est.evidences, ref.evidences, what="evidences")
    assert_close(est.alphas, ref.alphas, rtol=1e-8, what="alphas")
    assert_close(est.betas, ref.betas, rtol=1e-8, what="betas")
    # Posterior means: compare against the largest entry, since tiny entries
    # carry the round-off of the different (eigh / svd) decompositions.
    ms, ref_ms = est.ms.cpu().numpy(), ref.ms
    err = np.abs(ms - ref_ms).max() / np.abs(ref_ms).max()
    assert err <= ms_rtol, f"ms: relative error {err:.3g}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_classes", [1, 4])
@pytest.mark.parametrize("method", ["fixed_point", "icml"])
@pytest.mark.parametrize("solver", ["eigh", "svd"])
@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize("in_dtype", DTYPES, ids=["f64", "f32"])
def test_classification_matches_reference(device, shape, num_classes, method, solver, as_numpy, in_dtype):
    if as_numpy and device != "cpu":
        pytest.skip("numpy inputs live on the CPU")
    n, d = shape
    f64, y = make_features(n, d, num_classes, seed=n + d + num_classes)
    f = torch.from_numpy(f64).to(in_dtype)
    f_ref = f.double().numpy()  # the reference sees the same (rounded) values
    f_in = f.numpy() if as_numpy else f.to(device)
    y_in = y if as_numpy else torch.from_numpy(y).to(device)
    est = LogME(method=method, solver=solver)
    score = est.fit(f_in, y_in)
    assert isinstance(score, float)
    ref_score, ref = reference(f_ref, y, method=method)
    assert_matches_reference(est, ref, score, ref_score)
    assert est.evidences.device.type == device
    assert est.ms.shape == (num_classes, d)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("method", ["fixed_point", "icml"])
@pytest.mark.parametrize("solver", ["eigh", "svd"])
def test_regression_matches_reference(device, shape, method, solver):
    n, d = shape
    rng = np.random.default_rng(7)
    f = rng.standard_normal((n, d))
    w = rng.standard_normal((d, 3))
    y = f @ w * 0.3 + rng.standard_normal((n, 3))
    est = LogME(regression=True, method=method, solver=solver)
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y, regression=True, method=method)
    assert_matches_reference(est, ref, score, ref_score)
    # One target as a 1-D vector is one column.
    est1 = LogME(regression=True, method=method, solver=solver)
    s1 = est1.fit(torch.from_numpy(f).to(device), torch.from_numpy(y[:, 0]).to(device))
    r1, _ = reference(f, y[:, 0], regression=True, method=method)
    assert_close(s1, r1)
    assert est1.num_dim == 1


def test_multilabel_matches_reference(device):
    rng = np.random.default_rng(3)
    f = rng.standard_normal((200, 30))
    y = (f[:, :5] + 0.5 * rng.standard_normal((200, 5)) > 0).astype(np.float32)
    est = LogME(regression=True)
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y, regression=True)
    assert_matches_reference(est, ref, score, ref_score)


@pytest.mark.parametrize("shape", [(3000, 24), (600, 900)], ids=["N>D", "N<D"])
def test_thousand_classes(device, shape):
    n, d = shape
    f, y = make_features(n, d, 1000, seed=11)
    y[-1] = 999  # 1000 columns, some of them empty when N < 1000
    score = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device), reduction="none")
    ref_score, ref = reference(f, y)
    assert score.shape == (1000,)
    assert_close(score, ref.evidences, what="per-class evidences")
    assert_close(score.mean(), ref_score)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("solver", ["eigh", "svd"])
def test_legacy_evidence_reproduces_published_code(device, shape, solver):
    n, d = shape
    f, y = make_features(n, d, 3, seed=5)
    est = LogME(legacy_evidence=True, solver=solver)
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y, legacy_evidence=True)
    assert_matches_reference(est, ref, score, ref_score)
    correct = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device), solver=solver,
                    reduction="none")
    # The published code drops the D - N zero eigenvalues' log(alpha) terms.
    missing = max(d - n, 0) / 2 * torch.log(est.alphas) / n
    assert_close(est.evidences - missing, correct, what="legacy - correct")
    if n < d:
        assert (est.evidences > correct).all()


def test_legacy_evidence_has_no_effect_for_icml(device):
    f, y = make_features(20, 50, 3, seed=9)
    a = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device), method="icml")
    b = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device), method="icml",
              legacy_evidence=True)
    assert a.item() == b.item()


def test_absent_classes_are_counted_as_published(device):
    f, y = make_features(120, 10, 3, seed=2)
    y = np.where(y == 1, 4, y)  # ids {0, 2, 4}: classes 1 and 3 are empty
    est = LogME()
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y)
    assert est.num_dim == 5
    assert np.isfinite(score)
    assert_matches_reference(est, ref, score, ref_score)
    assert torch.all(est.ms[[1, 3]] == 0)  # no data, no posterior mean


def test_num_classes_adds_empty_columns(device):
    f, y = make_features(100, 8, 3, seed=4)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    per_class = logme(ft, yt, num_classes=6, reduction="none")
    assert per_class.shape == (6,)
    assert_close(per_class[:3], logme(ft, yt, reduction="none"))


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_badly_scaled_features(device, scale):
    f, y = make_features(200, 20, 4, seed=6, scale=scale)
    score = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, _ = reference(f, y)
    assert torch.isfinite(score)
    assert_close(score, ref_score)


def _high_precision_logme(f, y, num_classes, digits=40):
    """The published fixed point, evaluated directly (no eigendecomposition) in mpmath."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = digits
    n, d = f.shape
    F = mp.matrix(f.tolist())
    G = F.T * F
    eye, eps = mp.eye(d), mp.mpf("1e-5")
    scores = []
    for c in range(num_classes):
        Y = mp.matrix([[1.0 if v == c else 0.0] for v in y])
        b = F.T * Y
        alpha = beta = mp.mpf(1)
        for _ in range(11):
            t = alpha / beta
            inv = mp.inverse(G + t * eye)
            m = inv * b
            m2 = sum(x**2 for x in m)
            res2 = sum(x**2 for x in (Y - F * m))
            gamma = d - t * sum(inv[i, i] for i in range(d))
            alpha, beta = gamma / (m2 + eps), (n - gamma) / (res2 + eps)
            if abs(alpha / beta - t) / t <= mp.mpf("1e-3"):
                break
        logdet = mp.log(mp.det(alpha * eye + beta * G))
        L = d / 2 * mp.log(alpha) + n / 2 * mp.log(beta) - logdet / 2 - beta / 2 * res2 \
            - alpha / 2 * m2 - n / 2 * mp.log(2 * mp.pi)
        scores.append(L / n)
    return float(sum(scores) / num_classes)


def test_columns_of_very_different_scales(device):
    """cond(F) ~ 1e8: the Gram matrix squares it, so eigh loses digits and svd keeps them."""
    f, y = make_features(150, 12, 3, seed=8)
    f = f * np.logspace(-4, 4, 12)
    truth = _high_precision_logme(f, y, 3)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    assert_close(logme(ft, yt, solver="svd"), truth, rtol=1e-10)
    # README "Precision": with eigh, about cond(F)^2 * 1e-16 relative.
    assert_close(logme(ft, yt), truth, rtol=1e-4)
    assert_close(reference(f, y)[0], truth, rtol=1e-4)


def test_well_conditioned_matches_high_precision(device):
    f, y = make_features(60, 8, 2, seed=14)
    truth = _high_precision_logme(f, y, 2)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    for solver in ("eigh", "svd"):
        assert_close(logme(ft, yt, solver=solver), truth, rtol=1e-12)


@pytest.mark.parametrize("shape", [(200, 30), (20, 30)], ids=["N>D", "N<D"])
def test_rank_deficient_features(device, shape):
    n, d = shape
    rng = np.random.default_rng(12)
    y = rng.integers(0, 3, n)
    f = rng.standard_normal((n, 5)) @ rng.standard_normal((5, d))  # rank 5
    f[:, 0] = 0.0  # and an all-zero column
    est = LogME()
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y)
    assert np.isfinite(score)
    assert_close(score, ref_score, rtol=1e-8)
    assert_close(est.alphas, ref.alphas, rtol=1e-7, what="alphas")


def test_two_samples(device):
    f = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64, device=device)
    y = torch.tensor([0, 1], device=device)
    score = logme(f, y)
    ref_score, _ = reference(f.cpu().numpy(), y.cpu().numpy())
    assert_close(score, ref_score)


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_columns_hitting_max_iter_match_reference(device, max_iter):
    # Small max_iter stops some or all columns before they converge.
    f, y = make_features(150, 10, 3, seed=13)
    est = LogME(max_iter=max_iter)
    score = est.fit(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    ref_score, ref = reference(f, y, max_iter=max_iter)
    assert_matches_reference(est, ref, score, ref_score)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_float32_mode_within_documented_tolerance(device, shape):
    n, d = shape
    f, y = make_features(n, d, 5, seed=21)
    ft, yt = torch.from_numpy(f).float().to(device), torch.from_numpy(y).to(device)
    s64 = logme(ft, yt, reduction="none")
    s32 = logme(ft, yt, reduction="none", dtype=torch.float32)
    assert s32.dtype == torch.float32
    # README "Precision": float32 mode within 5e-4 relative of float64
    # (measured up to 9e-5 on these shapes).
    assert_close(s32, s64, rtol=5e-4, what="float32 vs float64")


def test_functional_returns_tensors_on_compute_device(device):
    f, y = make_features(100, 10, 3, seed=1)
    ft, yt = torch.from_numpy(f).float().to(device), torch.from_numpy(y).to(device)
    s = logme(ft, yt)
    assert s.dim() == 0 and s.dtype == torch.float64 and s.device.type == device
    per = logme(ft, yt, reduction="none")
    assert per.shape == (3,)
    assert_close(logme(ft, yt, reduction="sum"), per.sum())
    assert_close(s, per.mean())
    s_cpu = logme(ft, yt, device="cpu")
    assert s_cpu.device.type == "cpu"
    assert_close(s_cpu, s, rtol=1e-10)


def test_matches_published_api_shapes(device):
    f, y = make_features(100, 10, 3, seed=1)
    est = LogME()
    est.fit(f, y)
    pred = est.predict(f)
    assert isinstance(pred, np.ndarray) and pred.shape == (100,)
    _, ref = reference(f, y)
    np.testing.assert_array_equal(pred, ref.predict(f))
    pred_t = est.predict(torch.from_numpy(f).to(device))
    assert isinstance(pred_t, torch.Tensor)
    np.testing.assert_array_equal(pred_t.cpu().numpy(), pred)

    reg = LogME(regression=True)
    targets = f[:, :2] * 2.0
    reg.fit(torch.from_numpy(f).to(device), torch.from_numpy(targets).to(device))
    out = reg.predict(torch.from_numpy(f).to(device))
    assert out.shape == (100, 2)


def test_refit_warns_and_clears(device):
    f, y = make_features(60, 5, 3, seed=1)
    est = LogME()
    est.fit(f, y)
    with pytest.warns(UserWarning, match="re-fitting"):
        est.fit(f[:, :4], y % 2)
    assert est.num_dim == 2 and est.ms.shape == (2, 4)


def test_inputs_are_not_modified(device):
    f, y = make_features(50, 8, 3, seed=1)
    for in_dtype in DTYPES:
        ft = torch.from_numpy(f).to(in_dtype).to(device)
        yt = torch.from_numpy(y).to(device)
        f_copy, y_copy = ft.clone(), yt.clone()
        for solver in ("eigh", "svd"):
            LogME(solver=solver).fit(ft, yt)
            logme(ft, yt, solver=solver)
        assert torch.equal(ft, f_copy) and torch.equal(yt, y_copy)
    fn, yn = f.copy(), y.copy()
    LogME().fit(fn, yn)
    np.testing.assert_array_equal(fn, f)
    np.testing.assert_array_equal(yn, y)


def test_float32_input_is_converted_in_chunks(monkeypatch):
    """A float32 F is never copied whole to float64: the Gram matrix is built chunk by chunk."""
    from torch_logme import _primitives, sums

    f, y = make_features(500, 16, 3, seed=1)
    f32 = torch.from_numpy(f).float()
    whole = logme(f32, torch.from_numpy(y))
    seen = []
    real = sums.row_chunks

    def spy(*args, **kwargs):
        for rows, chunk in real(*args, **kwargs):
            seen.append(chunk.shape[0])
            yield rows, chunk

    # 64 rows of float64 on every device (the CPU's policy has a floor of rows too).
    for name in ("CHUNK_BYTES", "CPU_CHUNK_BYTES"):
        monkeypatch.setattr(_primitives, name, 64 * 16 * 8)
    monkeypatch.setattr(_primitives, "CPU_CHUNK_ROWS", 1)
    monkeypatch.setattr(sums, "row_chunks", spy)
    chunked = logme(f32, torch.from_numpy(y))
    assert max(seen) == 64 and sum(seen) == 500
    assert_close(chunked, whole, rtol=1e-12)


def test_requires_grad_inputs_give_plain_scores():
    f = torch.randn(40, 6, requires_grad=True)
    y = torch.randint(0, 2, (40,))
    s = logme(f, y)
    assert not s.requires_grad
    assert f.grad is None


def test_public_names():
    assert {"LogME", "LogMEAccumulator", "logme", "__version__"} <= set(torch_logme.__all__)
    scores = {"leep", "nce", "h_score", "regularized_h_score", "transrate", "gbc", "rank_models", "Ranking",
              "NCEAccumulator", "HScoreAccumulator", "RegularizedHScoreAccumulator", "TransRateAccumulator",
              "GBCAccumulator"}
    assert scores <= set(torch_logme.__all__)
    assert all(hasattr(torch_logme, name) for name in torch_logme.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import importlib

        importlib.reload(torch_logme)  # importing warns about nothing


@pytest.mark.parametrize("d", [255, 301, 1024])
def test_gram_update_upper_triangle(device, d):
    """add_gram_ accumulates the exact upper triangle (all the eigendecomposition reads)."""
    from torch_logme.sums import add_gram_

    chunk = torch.randn(97, d, dtype=torch.float64, device=device)
    gram = torch.ones(d, d, dtype=torch.float64, device=device)
    add_gram_(gram, chunk)
    add_gram_(gram, 2 * chunk)
    expected = 1.0 + 5.0 * (chunk.T @ chunk)
    assert torch.allclose(gram.triu(), expected.triu(), rtol=1e-12, atol=1e-10)
