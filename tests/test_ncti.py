"""NCTI (torch_logme.ncti) against its numpy reference, scikit-learn, the published values and combination."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from torch_logme import SCORES, accumulator, ncti, ncti_combine, reference
from torch_logme.ncti import TERMS, class_nuclear_norms

from conftest import make_features

RTOL = 1e-9


def _close(a, b, rtol=RTOL, atol=1e-12):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _ncti(x, y, **kw):
    return ncti(torch.as_tensor(x), torch.as_tensor(y), **kw)


def _branch(x, n_components=64, variance_components=32):
    """"svd" or "eigen": the LDA solver the summed PCA variances select."""
    _, variances = reference._pca_scores(np.asarray(x, dtype=np.float64), min(n_components, *x.shape))
    return "svd" if np.exp(-variances[:variance_components].sum()) <= 1e-10 else "eigen"


# (N, D, C, scale): both LDA solvers, N > D and N <= D, k = 64 < D and k = min(N, D).
CASES = [(240, 12, 4, 1.0), (240, 12, 4, 0.3), (300, 100, 4, 1.0), (300, 100, 4, 0.05), (30, 48, 3, 1.0),
         (30, 48, 3, 0.1), (64, 64, 5, 1.0), (500, 80, 10, 0.1), (150, 200, 2, 1.0)]


@pytest.mark.parametrize("case", CASES)
def test_equals_reference(case):
    n, d, c, scale = case
    x, y = make_features(n, d, c, seed=n + d + c, scale=scale)
    got = _ncti(x, y)
    assert got.shape == (3,) and got.dtype == torch.float64
    assert _close(got, reference.ncti(x, y))


def test_cases_cover_both_solvers():
    branches = {_branch(make_features(n, d, c, seed=n + d + c, scale=s)[0]) for n, d, c, s in CASES}
    assert branches == {"svd", "eigen"}


@pytest.mark.parametrize("options", [{"unbiased_within": True}, {"n_components": 8}, {"n_components": 20},
                                     {"variance_components": 2}, {"n_components": 5, "variance_components": 64}])
def test_options_equal_reference(options):
    for scale in (1.0, 0.1):
        x, y = make_features(400, 30, 6, seed=2, scale=scale)
        assert _close(_ncti(x, y, **options), reference.ncti(x, y, **options))


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_sklearn_data_equal_reference(name):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x = x.astype(np.float64)
    for scale in (1.0, 1.0 / np.abs(x).max()):
        assert _close(_ncti(x * scale, y), reference.ncti(x * scale, y), rtol=1e-8)


@pytest.mark.parametrize("scale, published", [
    (1.0, [727.0984274451332, 0.9610330272530853, 5.106678375239401]),  # the SVD solver
    (1 / 16, [666.4843245584989, 0.95991819193585, 5.107706971656027]),  # the eigen solver, shrinkage 0.0107
])
def test_published_values(scale, published):
    """NCTI_Score of BUserName/NCTI metrics.py on load_digits (run once, numpy 2.4, scikit-learn 1.9.1)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    assert _close(_ncti(x.astype(np.float64) * scale, y), published, rtol=1e-11)


def test_equals_sklearn_pca_and_lda():
    """The three terms from scikit-learn's own PCA (exact solver) and LDA, on full-rank features."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    # scikit-learn 1.9 normalised the SVD solver's within-class covariance by N instead of N - C.
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    unbiased = (major, minor) < (1, 9)
    for scale in (1.0, 0.05):
        x, y = make_features(400, 90, 6, seed=3, scale=scale)
        z = PCA(n_components=64, svd_solver="full").fit_transform(x)
        shrinkage = max(np.exp(-PCA(n_components=64, svd_solver="full").fit(x).explained_variance_[:32].sum()), 1e-10)
        lda = (LinearDiscriminantAnalysis(solver="svd") if shrinkage == 1e-10
               else LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage))
        low = lda.fit_transform(z, y)
        p = lda.predict_proba(z)
        want = [np.linalg.norm(low - low.mean(0), "nuc"), p[np.arange(len(y)), y].mean(),
                np.log(sum(np.linalg.norm(p[y == c], "nuc") for c in range(6)))]
        assert _close(_ncti(x, y, unbiased_within=unbiased), want, rtol=1e-9)


def _published_combination(terms):
    """The published evaluation script's arithmetic, per term: (t - min) / (max - min); ncc + seli - vc."""
    t = np.asarray(terms, dtype=np.float64)
    seli, ncc, vc = t[:, 0], t[:, 1], t[:, 2]
    mascore = (seli - seli.min()) / (seli.max() - seli.min())
    mcscore = (ncc - ncc.min()) / (ncc.max() - ncc.min())
    cpscore = (vc - vc.min()) / (vc.max() - vc.min())
    return mcscore + mascore - cpscore


@pytest.mark.parametrize("models", [3, 5, 11])
def test_combine_equals_published_combination(models):
    rng = np.random.default_rng(models)
    terms = np.column_stack([rng.uniform(100, 900, models), rng.uniform(0.5, 1, models), rng.uniform(2, 6, models)])
    got = ncti_combine(torch.from_numpy(terms))
    assert got.shape == (models,)
    assert np.array_equal(got.numpy(), _published_combination(terms))
    assert np.array_equal(got.numpy(), reference.ncti_combine(terms))


def test_combine_of_real_terms():
    """Terms of three models (features of different quality) on the same labels, combined."""
    x, y = make_features(300, 70, 5, seed=4)
    rng = np.random.default_rng(4)
    pool = [x, x + 2.0 * rng.standard_normal(x.shape), rng.standard_normal(x.shape)]
    terms = torch.stack([_ncti(f, y) for f in pool])
    scores = ncti_combine(terms)
    assert np.allclose(scores.numpy(), _published_combination(terms.numpy()), rtol=0, atol=1e-15)
    assert int(scores.argmax()) == 0 and int(scores.argmin()) == 2
    assert torch.equal(SCORES["ncti"].combine(terms), scores)


def test_combine_ties_and_bad_shapes():
    one = torch.tensor([[3.0, 0.9, 4.0]], dtype=torch.float64)
    assert torch.equal(ncti_combine(one), torch.zeros(1, dtype=torch.float64))  # the published code: NaN
    tied = torch.tensor([[1.0, 0.5, 2.0], [3.0, 0.5, 2.0], [2.0, 0.5, 2.0]], dtype=torch.float64)
    assert torch.equal(ncti_combine(tied), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    for bad in (torch.zeros(3), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match=r"\[M, 3\]"):
            ncti_combine(bad)
    with pytest.raises(TypeError, match=r"\[M, 3\], got ndarray"):  # a wrong type is a TypeError, as in etran
        ncti_combine(np.zeros((2, 3)))


def test_class_nuclear_norms_blocks_and_windows(monkeypatch):
    """Several blocks of classes and classes taller than a window (QR-reduced) give the SVD's nuclear norms."""
    module = importlib.import_module("torch_logme.ncti")  # the attribute torch_logme.ncti is the function

    rng = np.random.default_rng(5)
    counts = [1, 3, 40, 7, 90, 2, 25]
    y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    p = rng.dirichlet(np.ones(len(counts)) * 0.3, size=len(y))
    want = [np.linalg.norm(p[y == c], "nuc") for c in range(len(counts))]
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    monkeypatch.setattr(module, "MIN_ROWS", 4)  # windows of max(C, 4) = 7 rows
    for budget in (1 << 30, 2000):
        got = class_nuclear_norms(lambda rows: pt[rows], yt, counts, len(counts), torch.float64, budget=budget)
        assert _close(got, want, rtol=1e-13)


def test_absent_class_ids_are_ignored():
    x, y = make_features(300, 20, 4, seed=6)
    assert _close(_ncti(x, np.array([1, 5, 6, 30])[y]), _ncti(x, y), rtol=1e-13)


def test_too_few_classes_or_samples_raise():
    x, y = make_features(40, 6, 3, seed=7)
    with pytest.raises(ValueError, match="at least two classes"):
        _ncti(x, np.zeros(40, dtype=np.int64))
    with pytest.raises(ValueError, match="more samples than classes"):
        _ncti(x[:3], np.arange(3))


def test_rank_deficient_features():
    """Duplicated and dependent columns: the range is what counts; round-off components are exactly 0."""
    x, y = make_features(300, 20, 4, seed=8)
    dup = np.hstack([x, x[:, :5], x[:, :3] - 2 * x[:, 5:8]])
    assert _branch(dup) == "svd" and _branch(x) == "svd"  # unshrunk: invariant to any invertible map
    assert _close(_ncti(dup, y), _ncti(x, y), rtol=1e-9)
    assert _close(_ncti(dup, y), reference.ncti(dup, y), rtol=1e-9)


def test_badly_scaled_columns():
    """Columns over twelve decades: components of relative variance 1e-24 still count (as an SVD finds them)."""
    x, y = make_features(300, 20, 4, seed=9)
    wide = x * np.logspace(-6, 6, 20)
    assert _branch(wide) == "svd"
    assert _close(_ncti(wide, y), _ncti(x, y), rtol=1e-7)  # an invertible map of the same features
    assert _close(_ncti(wide, y), reference.ncti(wide, y), rtol=1e-7)


def test_shift_and_scale():
    x, y = make_features(300, 40, 5, seed=10)
    assert _branch(x) == "svd"
    base = _ncti(x, y)
    assert _close(_ncti(x + 1e6, y), base, rtol=1e-6)
    assert _close(_ncti(x * 1e100, y), base, rtol=1e-10)  # unshrunk LDA: scale-free
    assert _close(_ncti(x * 1e-100, y), reference.ncti(x * 1e-100, y), rtol=1e-9)  # shrunk (t near 1)


def test_float32():
    x, y = make_features(400, 70, 5, seed=11)
    want = _ncti(x, y)
    assert _close(_ncti(x.astype(np.float32), y), want, rtol=1e-6)
    assert _close(_ncti(x, y, dtype=torch.float32).double(), want, rtol=1e-3)
    wide, wy = make_features(40, 100, 3, seed=12)
    assert bool(torch.isfinite(_ncti(wide, wy, dtype=torch.float32)).all())


def test_inputs_not_modified():
    x, y = make_features(200, 30, 4, seed=13)
    xc, yc = x.copy(), y.copy()
    _ncti(x, y)
    ncti(x, y)
    assert np.array_equal(x, xc) and np.array_equal(y, yc)


@pytest.mark.parametrize("options, exc, match", [
    ({"n_components": 0}, ValueError, "n_components"), ({"n_components": 2.5}, ValueError, "n_components"),
    ({"variance_components": -1}, ValueError, "variance_components"),
    ({"unbiased_within": "yes"}, TypeError, "unbiased_within"), ({"dtype": torch.int64}, ValueError, "dtype"),
])
def test_bad_options(options, exc, match):
    x, y = make_features(50, 4, 2, seed=14)
    with pytest.raises(exc, match=match):
        _ncti(x, y, **options)


def test_registry_spec():
    spec = SCORES["ncti"]
    assert spec.fn is ncti and spec.larger_is_better and not spec.streams
    assert spec.pooled and spec.terms == TERMS == ("seli", "ncc", "vc") and spec.combine is ncti_combine
    with pytest.raises(ValueError, match="'ncti' does not stream .*fitted to all samples"):
        accumulator("ncti", 8)


def test_devices(device):
    x, y = make_features(300, 80, 6, seed=15)
    xt = torch.from_numpy(x).to(device=device, dtype=torch.float32)
    got = ncti(xt, torch.from_numpy(y).to(device))
    assert got.device.type == torch.device(device).type
    assert _close(got.cpu(), _ncti(xt.cpu().double().numpy(), y), rtol=1e-9)
