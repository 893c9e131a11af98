"""PARC: against the numpy reference and scikit-learn's PCA, the multi-pass ranking, options, edge cases, devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_logme import parc, reference

from conftest import make_features

RTOL = 1e-9


def _close(got, want, rtol=RTOL):
    assert abs(float(got) - want) <= rtol * abs(want) + 1e-12, (float(got), want)


@pytest.mark.parametrize("n_dims", [32, 5, None])
@pytest.mark.parametrize("shape", [(160, 48, 4), (120, 12, 3), (40, 90, 3), (36, 36, 4), (20, 60, 2)],
                         ids=["N>D>k", "N>k>D", "N<D", "N=D", "N<k"])
def test_equals_reference(shape, n_dims, device):
    x, y = make_features(*shape, seed=shape[0])
    want = reference.parc(x, y, n_dims=n_dims)
    _close(parc(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), n_dims=n_dims), want)


def test_multi_pass_ranking_is_exact():
    # Duplicated samples make exactly tied dissimilarities; the passes must rank them as one sort does.
    x, y = make_features(90, 20, 3, seed=7)
    x = np.vstack([x, x[:30]])
    y = np.concatenate([y, y[:30]])
    want = reference.parc(x, y)
    one = float(parc(x, y))
    # Duplicates also make dissimilarities equal up to round-off, which torch and numpy order differently.
    _close(one, want, rtol=1e-6)
    for block in (None, 13):
        # The same blocks give the same values, which every split into passes ranks alike, bit for bit.
        whole = float(parc(x, y, block_size=block))
        _close(whole, one, rtol=1e-6)  # other blocks round a few values differently, which moves ranks
        for pairs in (2000, 400):
            assert float(parc(x, y, pairs_per_pass=pairs, block_size=block)) == whole


def test_counting_passes_split_crowded_intervals_and_count_repeats():
    rng = np.random.default_rng(4)
    y = np.arange(60) % 3
    # Rows nearly proportional to one another: correlations within 1e-7 of +-1, crowded in the first and
    # last of the 65536 intervals, which a second counting pass splits until the runs fit.
    crowded = rng.standard_normal(60)[:, None] * rng.standard_normal(12) + 1e-4 * rng.standard_normal((60, 12))
    one = float(parc(crowded, y, n_dims=None))
    assert float(parc(crowded, y, n_dims=None, pairs_per_pass=100)) == one
    _close(one, reference.parc(crowded, y, n_dims=None), rtol=1e-6)
    y = y[:40]
    # Twenty equal samples: 190 dissimilarities exactly 0, ranked from their count alone.
    repeated = rng.standard_normal((40, 12))
    repeated[:20] = repeated[0]
    one = float(parc(repeated, y))
    assert float(parc(repeated, y, pairs_per_pass=100)) == one
    _close(one, reference.parc(repeated, y), rtol=1e-6)


def test_reference_ranks_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    x, y = make_features(60, 10, 3, seed=2)
    z = x - x.mean(0)
    z = z / z.std(0)
    r = np.corrcoef(z)
    upper = np.triu_indices(60, 1)
    want = 100 * stats.spearmanr(1 - r[upper], (y[:, None] != y[None, :])[upper])[0]
    _close(reference.parc(x, y, n_dims=None), want, rtol=1e-12)


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_matches_scikit_learn_pca(solver):
    # The published pipeline after its PCA is reference.parc(n_dims=None) on the reduced features.
    decomposition = pytest.importorskip("sklearn.decomposition")
    x, y = make_features(300, 80, 5, seed=11)
    options = dict(svd_solver="randomized", random_state=1919, iterated_power=1) if solver == "randomized" else {}
    reduced = decomposition.PCA(n_components=32, **options).fit_transform(x)
    want = reference.parc(reduced, y, n_dims=None)
    _close(parc(x, y, pca="exact" if solver == "full" else "randomized"), want, rtol=1e-8)
    xt = torch.from_numpy(x)  # N < D: scikit-learn works on x^T
    reduced = decomposition.PCA(n_components=32, **options).fit_transform(x[:60])
    _close(parc(xt[:60], torch.from_numpy(y[:60]), pca="exact" if solver == "full" else "randomized"),
           reference.parc(reduced, y[:60], n_dims=None), rtol=1e-8)


@pytest.mark.parametrize("loader", ["load_iris", "load_wine", "load_digits", "load_breast_cancer"])
def test_bundled_data_sets(loader):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, loader)(return_X_y=True)
    x, y = x[:300], y[:300]
    _close(parc(x, y), reference.parc(x, y))
    _close(parc(x, y, n_dims=None), reference.parc(x, y, n_dims=None))


def test_constant_columns_without_reduction():
    x, y = make_features(80, 6, 3, seed=6)
    x = np.hstack([x, np.full((80, 1), 3.7), np.full((80, 1), 1e6 + 0.1)])  # constant columns are zeros
    _close(parc(x, y, n_dims=None), reference.parc(x, y, n_dims=None))


def test_rank_deficient_and_degenerate_features():
    x, y = make_features(80, 10, 3, seed=3)
    doubled = np.hstack([x, x, x, x])  # rank 10 < 32: the other components are round-off, made 0
    _close(parc(doubled, y), reference.parc(doubled, y))
    assert np.isfinite(float(parc(doubled, y, pca="randomized")))
    constant_row = x.copy()
    constant_row[5] = x.mean(0)  # its components are all 0: it correlates 0 with every sample
    _close(parc(constant_row, y), reference.parc(constant_row, y))
    # No sample differs from another: no ordering to correlate.
    assert float(parc(np.ones((20, 3)), np.arange(20) % 2)) == 0.0


def test_scale_offset_and_dtypes():
    x, y = make_features(100, 40, 4, seed=5)
    want = reference.parc(x, y)
    for factor in (1e-150, 1e150):
        _close(parc(x * factor, y), want, rtol=1e-7)
    _close(parc(x + 1e6, y), want, rtol=1e-5)
    spread = x * np.logspace(-3, 3, x.shape[1])
    _close(parc(spread, y), reference.parc(spread, y), rtol=1e-7)
    _close(parc(torch.from_numpy(x).float(), torch.from_numpy(y)), reference.parc(x.astype(np.float32), y))
    assert abs(float(parc(x, y, dtype=torch.float32)) - want) < 1e-3 * abs(want)


def test_labels():
    x, y = make_features(60, 8, 3, seed=1)
    _close(parc(x, np.array([2, 7, 40])[y]), float(parc(x, y)))  # only which samples share a class matters
    with pytest.raises(ValueError, match="at least two classes"):
        parc(x, np.zeros(60, dtype=np.int64))
    with pytest.raises(ValueError, match="two samples of one class"):
        parc(x, np.arange(60))


def test_inputs_not_modified():
    x, y = make_features(50, 40, 3, seed=0)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    xc, yc = xt.clone(), yt.clone()
    parc(xt, yt)
    parc(xt, yt, pca="randomized", pairs_per_pass=100)
    assert torch.equal(xt, xc) and torch.equal(yt, yc)


def test_bad_options():
    x, y = make_features(20, 3, 2, seed=0)
    with pytest.raises(ValueError, match="n_dims must be a positive int"):
        parc(x, y, n_dims=0)
    with pytest.raises(ValueError, match="pca must be one of"):
        parc(x, y, pca="svd")
    with pytest.raises(ValueError, match="pairs_per_pass must be a positive int"):
        parc(x, y, pairs_per_pass=0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        parc(x, y, block_size=-1)
    with pytest.raises(ValueError, match="samples|rows|disagree"):
        parc(x, y[:-1])
