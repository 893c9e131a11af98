"""NLEEP: against the numpy reference, scikit-learn's PCA and GaussianMixture, edge cases and bad options."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from torch_logme import SCORES, accumulator, nleep, reference
from torch_logme.nleep import kmeans_labels, pca_reduce

from conftest import make_features

RTOL = 1e-9


def _close(a, b, rtol=RTOL, atol=1e-12) -> bool:
    a, b = float(a), float(b)
    return abs(a - b) <= atol + rtol * abs(b)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("shape", [(240, 12, 4), (60, 60, 3), (40, 90, 2), (500, 30, 6)])
def test_matches_reference(shape, legacy):
    for seed in (1, 2):
        x, y = make_features(*shape, seed=seed)
        got = nleep(x, y, legacy_leep=legacy, seed=seed)
        assert got.dim() == 0 and got.dtype == torch.float64
        assert _close(got, reference.nleep(x, y, legacy_leep=legacy, seed=seed))


def test_bundled_data_sets_match_reference_and_scikit_learn():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_iris, load_wine
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    del sklearn
    for loader in (load_iris, load_wine):
        data = loader()
        x, y = data.data.astype(np.float64), data.target.astype(np.int64)
        assert _close(nleep(x, y), reference.nleep(x, y))
        # The published pipeline, seeded: PCA(0.8), then GaussianMixture(5 C) from its KMeans labels.
        k = 5 * len(np.unique(y))
        coords = PCA(n_components=0.8).fit_transform(x)
        np.testing.assert_allclose(pca_reduce(x).numpy(), coords, rtol=0, atol=1e-10 * np.abs(coords).max())
        labels = KMeans(n_clusters=k, n_init=1, random_state=np.random.RandomState(7)).fit(coords).labels_
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = GaussianMixture(n_components=k, random_state=7).fit(coords)
        post = gm.predict_proba(coords)
        got = nleep(x, y, init=torch.from_numpy(labels.astype(np.int64)))
        assert _close(got, reference.leep(post, y))
        legacy = nleep(x, y, init=labels.astype(np.int64), legacy_leep=True)
        expected = (post * (reference_joint(post, y)[y])).sum(1).mean()
        assert _close(legacy, expected)


def reference_joint(post: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(y | z) [C, K] of posteriors post [N, K] and labels y [N]."""
    joint = np.stack([post[y == c].sum(0) for c in range(y.max() + 1)]) / y.shape[0]
    return joint / joint.sum(0)


@pytest.mark.parametrize("key", ["precisions", "covariances"])
def test_parameter_init_matches_scikit_learn(key):
    pytest.importorskip("sklearn")
    from sklearn.mixture import GaussianMixture

    x, y = make_features(300, 10, 3, seed=4)
    coords = pca_reduce(x).numpy()
    k = 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = GaussianMixture(k, max_iter=1, random_state=0).fit(coords)
    gm = GaussianMixture(k, weights_init=start.weights_, means_init=start.means_,
                         precisions_init=start.precisions_).fit(coords)
    square = start.precisions_ if key == "precisions" else np.linalg.inv(start.precisions_)
    got = nleep(x, y, init={"weights": start.weights_, "means": start.means_, key: square})
    assert _close(got, reference.leep(gm.predict_proba(coords), y))


def test_responsibilities_init_equals_labels_init():
    x, y = make_features(200, 8, 3, seed=5)
    coords = pca_reduce(x)
    labels = kmeans_labels(coords, 15, np.random.default_rng(3))
    one_hot = torch.nn.functional.one_hot(labels, 15).double()
    assert _close(nleep(x, y, init=labels), nleep(x, y, init=one_hot), rtol=0, atol=0)
    # The default is exactly this seeded k-means.
    assert _close(nleep(x, y, seed=3), nleep(x, y, init=labels), rtol=0, atol=0)


def test_invariant_to_the_order_of_the_samples():
    x, y = make_features(200, 8, 3, seed=16)
    perm = np.random.default_rng(0).permutation(200)
    assert _close(nleep(x[perm], y[perm]), nleep(x, y), rtol=1e-10)


def test_seeds_are_reproducible_and_restarts_run():
    x, y = make_features(200, 8, 3, seed=6)
    assert float(nleep(x, y, seed=11)) == float(nleep(x, y, seed=11))
    many = nleep(x, y, n_init=3, seed=11)
    assert torch.isfinite(many) and float(many) <= 0


def test_shift_scale_and_degenerate_features():
    x, y = make_features(150, 10, 3, seed=8)
    base = float(nleep(x, y))
    assert _close(nleep(x + 1e6, y), base, rtol=1e-7)  # PCA centres first
    # Duplicated and all-zero columns change nothing: PCA sees the same variance directions.
    wider = np.concatenate([x, x[:, :3], np.zeros((150, 2))], axis=1)
    assert _close(nleep(wider, y), reference.nleep(wider, y))
    # Columns over six decades, tiny and huge features: finite, as the reference.
    spread = x * np.logspace(-3, 3, 10)
    assert _close(nleep(spread, y), reference.nleep(spread, y))
    for factor in (1e-9, 1e3):
        assert _close(nleep(x * factor, y), reference.nleep(x * factor, y), rtol=1e-8)
    # reg_covar is absolute (as published): at 1e9 a component spanning fewer than d directions has a
    # covariance whose round-off (1e18 eps) swamps 1e-6, so it is not positive definite, as in scikit-learn.
    with pytest.raises(ValueError, match="not positive definite"):
        nleep(x * 1e9, y)
    with pytest.raises(ValueError, match="overflow"):
        nleep(x * 1e160, y)
    with pytest.raises(ValueError, match="no variance"):
        nleep(np.ones((20, 3)), np.arange(20) % 2)


def test_classes_present_and_absent():
    x, y = make_features(120, 6, 3, seed=9)
    sparse_ids = np.array([0, 4, 9])[y]
    assert _close(nleep(x, sparse_ids), nleep(x, y))  # components per class present; absent ids add nothing
    one = np.zeros(120, dtype=np.int64)
    assert abs(float(nleep(x, one))) < 1e-15  # P(y | z) = 1: log 1
    assert _close(nleep(x, one, legacy_leep=True), 1.0)
    with pytest.raises(ValueError, match="at least 30 samples"):
        nleep(x[:20], np.arange(20) % 6)


def test_float32_inputs_and_compute():
    x, y = make_features(200, 8, 3, seed=10)
    x32 = x.astype(np.float32)
    assert _close(nleep(torch.from_numpy(x32), y), reference.nleep(x32.astype(np.float64), y))
    low = nleep(x32, y, dtype=torch.float32)
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_inputs_are_not_modified():
    x, y = make_features(100, 6, 2, seed=12)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    nleep(xt, yt)
    assert np.array_equal(xt.numpy(), x) and np.array_equal(yt.numpy(), y)


def test_bad_options():
    x, y = make_features(100, 6, 2, seed=13)
    for kwargs, error in [
        (dict(components_per_class=0), ValueError), (dict(components_per_class=2.5), ValueError),
        (dict(variance=1.0), ValueError), (dict(variance=0), ValueError), (dict(reg_covar=-1.0), ValueError),
        (dict(tol=0.0), ValueError), (dict(max_iter=0), ValueError), (dict(n_init=0), ValueError),
        (dict(seed=-1), ValueError), (dict(seed=True), ValueError), (dict(legacy_leep="yes"), TypeError),
        (dict(init=[0, 1]), TypeError), (dict(init=torch.zeros(5, dtype=torch.int64)), ValueError),
        (dict(init=torch.full((100,), 10)), ValueError), (dict(init=torch.ones(100, 3)), ValueError),
        (dict(init=torch.zeros(100, dtype=torch.int64), n_init=2), ValueError),
        (dict(init={"means": np.zeros((10, 1))}), ValueError),
        (dict(dtype=torch.int32), (ValueError, TypeError)),
    ]:
        with pytest.raises(error):
            nleep(x, y, **kwargs)
    d = pca_reduce(x).shape[1]
    good = {"weights": np.full(10, 0.1), "means": np.zeros((10, d)), "covariances": np.tile(np.eye(d), (10, 1, 1))}
    nleep(x, y, init=good)
    with pytest.raises(ValueError, match="sum to 1"):
        nleep(x, y, init={**good, "weights": np.full(10, 0.2)})
    with pytest.raises(ValueError, match="positive definite"):
        nleep(x, y, init={**good, "covariances": -good["covariances"]})
    with pytest.raises(ValueError, match="shape"):
        nleep(x, y, init={**good, "means": np.zeros((10, d + 1))})


def test_warns_when_em_does_not_converge():
    x, y = make_features(200, 8, 3, seed=14)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        nleep(x, y, max_iter=1)


def test_registered_without_accumulator():
    spec = SCORES["nleep"]
    assert spec.fn is nleep and not spec.streams and spec.larger_is_better and not spec.pooled
    with pytest.raises(ValueError, match="'nleep' does not stream"):
        accumulator("nleep", 8)


def test_devices_agree(device):
    x, y = make_features(300, 12, 4, seed=15)
    xt = torch.from_numpy(x).to(device, torch.float32)
    got = nleep(xt, torch.from_numpy(y).to(device))
    assert got.device.type == torch.device(device).type
    assert _close(got.cpu(), reference.nleep(xt.double().cpu().numpy(), y))
