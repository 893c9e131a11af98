"""SFDA (torch_logme.sfda) against its numpy reference, the published values, and its edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_logme import SCORES, accumulator, reference, sfda
from torch_logme.sfda import largest_eigenvalue

from conftest import make_features

RTOL = 1e-9


def _close(a, b, rtol=RTOL, atol=1e-12):
    return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))


def _sfda(x, y, **kw):
    return sfda(torch.as_tensor(x), torch.as_tensor(y), **kw)


@pytest.mark.parametrize("shape", [(240, 12, 4), (500, 40, 10), (60, 60, 3), (40, 90, 5), (300, 8, 2)])
@pytest.mark.parametrize("log_likelihood", [True, False])
def test_equals_reference(shape, log_likelihood):
    x, y = make_features(*shape, seed=sum(shape))
    got = _sfda(x, y, log_likelihood=log_likelihood)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert _close(got, reference.sfda(x, y, log_likelihood=log_likelihood))


@pytest.mark.parametrize("options", [{"shrinkage": 0.3}, {"shrinkage": 1.0}, {"power_iterations": None},
                                     {"power_iterations": 1}, {"power_iterations": 20}])
def test_options_equal_reference(options):
    x, y = make_features(300, 16, 5, seed=1, scale=0.4)
    assert _close(_sfda(x, y, **options), reference.sfda(x, y, **options))


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_sklearn_data_equal_reference(name):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x = x.astype(np.float64)
    for scale in (1.0, 1.0 / np.abs(x).max()):  # the shrinkage reads the scale: two regimes
        assert _close(_sfda(x * scale, y), reference.sfda(x * scale, y))


@pytest.mark.parametrize("name, published", [
    ("iris", 0.8764934341266523), ("wine", 0.8928686466906237), ("digits", 0.8153094595671366),
])
def test_published_values(name, published):
    """SFDA_Score of TencentARC/SFDA metrics.py on these data sets (run once, numpy 2.4, scikit-learn 1.9)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    assert _close(_sfda(x.astype(np.float64), y, log_likelihood=False), published, rtol=1e-12)


def test_power_iteration_is_the_published_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 30))
    a = a @ a.T
    x = a.sum(1)
    for _ in range(3):  # the published rounds: two products each, normalised
        u = a @ x / np.linalg.norm(a @ x)
        x = a @ u / np.linalg.norm(a @ u)
    assert largest_eigenvalue(torch.from_numpy(a), 3) == pytest.approx(x @ a @ u, rel=1e-14)
    assert largest_eigenvalue(torch.from_numpy(a), None) == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-12)
    # a 1 = 0: the published iteration divides 0 by 0; the exact value is used instead.
    b = a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()
    assert largest_eigenvalue(torch.from_numpy(b), 3) == pytest.approx(np.linalg.eigvalsh(b)[-1], rel=1e-10)


def test_rows_summing_to_one():
    """Probability-like features: S_w 1 = 0, so the published power iteration starts from 0 (NaN there)."""
    x, y = make_features(200, 10, 4, seed=3)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    got = _sfda(p, y)
    assert torch.isfinite(got) and _close(got, reference.sfda(p, y))


def test_absent_class_ids_are_ignored():
    x, y = make_features(300, 12, 3, seed=4)
    sparse = np.array([0, 4, 9])[y]
    assert _close(_sfda(x, sparse), _sfda(x, y), rtol=1e-13)


def test_one_class_and_constant_classes_raise():
    x, y = make_features(100, 5, 3, seed=5)
    with pytest.raises(ValueError, match="at least two classes"):
        _sfda(x, np.zeros(100, dtype=np.int64))
    means = np.random.default_rng(0).standard_normal((3, 5))
    with pytest.raises(ValueError, match="constant within every class"):
        _sfda(means[y], y)


def test_rank_deficient_and_badly_scaled():
    x, y = make_features(300, 12, 4, seed=6)
    dup = np.hstack([x, x[:, :4], 2 * x[:, :3] - x[:, 3:6]])
    assert torch.isfinite(_sfda(dup, y))
    assert _close(_sfda(dup, y), reference.sfda(dup, y), rtol=1e-7)
    wide = x * np.logspace(-3, 3, 12)
    assert _close(_sfda(wide, y), reference.sfda(wide, y), rtol=1e-8)


def test_shift_invariant_and_scale_dependent():
    x, y = make_features(300, 12, 4, seed=7, scale=0.2)
    base = _sfda(x, y)
    assert _close(_sfda(x + 1e6, y), base, rtol=1e-6)
    assert _close(_sfda(x - 3.0, y), base, rtol=1e-10)
    # The adaptive shrinkage reads lambda_max in the features' units: scaling them changes the score ...
    assert not _close(_sfda(10 * x, y), base, rtol=1e-6)
    # ... but not with a given shrinkage (the discriminant itself is scale-free).
    assert _close(_sfda(10 * x, y, shrinkage=0.01), _sfda(x, y, shrinkage=0.01), rtol=1e-10)


def test_huge_and_tiny_features():
    x, y = make_features(200, 8, 3, seed=8)
    for scale in (1e150, 1e-150):
        assert _close(_sfda(x * scale, y, shrinkage=0.05), _sfda(x, y, shrinkage=0.05), rtol=1e-9)
    assert torch.isfinite(_sfda(x * 1e150, y))


def test_separation_scores_higher():
    x, y = make_features(400, 16, 4, seed=9)
    rng = np.random.default_rng(9)
    weak = rng.standard_normal(x.shape) + 0.1 * np.eye(16)[y % 16]
    assert float(_sfda(x, y)) > float(_sfda(weak, y))
    assert float(_sfda(x, y)) <= 0 and 0 < float(_sfda(x, y, log_likelihood=False)) <= 1


def test_float32():
    x, y = make_features(400, 20, 5, seed=10)
    want = float(_sfda(x, y))
    assert _close(_sfda(x.astype(np.float32), y), want, rtol=1e-6)  # float32 input, float64 compute
    assert _close(_sfda(x, y, dtype=torch.float32), want, rtol=1e-3)
    wide, wy = make_features(30, 64, 3, seed=11)  # N < D: S_w singular, shrinkage 1e-10
    assert torch.isfinite(_sfda(wide, wy, dtype=torch.float32))


def test_inputs_not_modified():
    x, y = make_features(200, 10, 4, seed=12)
    xc, yc = x.copy(), y.copy()
    _sfda(x, y)
    sfda(x, y)
    assert np.array_equal(x, xc) and np.array_equal(y, yc)
    xt = torch.from_numpy(x.copy())
    xt_copy = xt.clone()
    sfda(xt, torch.from_numpy(y))
    assert torch.equal(xt, xt_copy)


@pytest.mark.parametrize("options, exc, match", [
    ({"shrinkage": -0.1}, ValueError, "shrinkage"), ({"shrinkage": 1.5}, ValueError, "shrinkage"),
    ({"shrinkage": "0.1"}, ValueError, "shrinkage"), ({"shrinkage": True}, ValueError, "shrinkage"),
    ({"power_iterations": 0}, ValueError, "power_iterations"),
    ({"power_iterations": 2.0}, ValueError, "power_iterations"),
    ({"log_likelihood": 1}, TypeError, "log_likelihood"), ({"dtype": torch.int64}, ValueError, "dtype"),
])
def test_bad_options(options, exc, match):
    x, y = make_features(50, 4, 2, seed=13)
    with pytest.raises(exc, match=match):
        _sfda(x, y, **options)


def test_singular_with_zero_shrinkage_raises():
    x, y = make_features(20, 40, 2, seed=14)
    with pytest.raises(ValueError, match="singular"):
        _sfda(x, y, shrinkage=0.0)


def test_registry_spec():
    spec = SCORES["sfda"]
    assert spec.fn is sfda and spec.larger_is_better and not spec.streams and not spec.pooled
    with pytest.raises(ValueError, match="'sfda' does not stream .*several times"):
        accumulator("sfda", 8)


def test_devices(device):
    x, y = make_features(300, 24, 6, seed=15)
    xt = torch.from_numpy(x).to(device=device, dtype=torch.float32)
    got = sfda(xt, torch.from_numpy(y).to(device))
    assert got.device.type == torch.device(device).type
    assert _close(got.cpu(), _sfda(xt.cpu().double().numpy(), y), rtol=1e-9)
