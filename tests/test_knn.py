"""kNN accuracy: against the numpy reference (random, tied and bundled data), options, edge cases, devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_logme import knn, reference

from conftest import make_features


def _close(got, want, tol=1e-12):
    assert abs(float(got) - want) <= tol, (float(got), want)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 3, 4, 7])
@pytest.mark.parametrize("shape", [(150, 8, 4), (40, 60, 3), (50, 50, 5)], ids=["N>D", "N<D", "N=D"])
def test_equals_reference(metric, k, shape, device):
    x, y = make_features(*shape, seed=k)
    want = reference.knn(x, y, k=k, metric=metric)
    for block in (None, 16, 7):
        _close(knn(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), k=k, metric=metric,
                   block_size=block), want)


@pytest.mark.parametrize("loader", ["load_iris", "load_wine", "load_digits", "load_breast_cancer"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_bundled_data_sets(loader, metric):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = getattr(datasets, loader)(return_X_y=True)
    x, y = x[:500], y[:500]
    _close(knn(x, y, metric=metric, block_size=128), reference.knn(x, y, metric=metric))
    _close(knn(x, y, metric=metric, binary_f1=True), reference.knn(x, y, metric=metric, binary_f1=True))


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_exact_ties_go_to_the_lower_index(k):
    # Integer features on a small grid: many exactly equal distances, decided by index, whatever the tiles.
    rng = np.random.default_rng(k)
    x = rng.integers(0, 3, (200, 4)).astype(np.float64)
    y = rng.integers(0, 3, 200)
    want = reference.knn(x, y, k=k)
    for block in (None, 3, 17, 64):
        _close(knn(x, y, k=k, block_size=block), want)
    _close(knn(x.astype(np.int64), y, k=k), want)
    _close(knn(x + 1e6, y, k=k), want)  # the offset goes exactly; the ties stay ties
    _close(knn(x.astype(np.float32), y, k=k, dtype=torch.float32), want, tol=1e-7)


def test_duplicated_samples_are_neighbours_but_not_self():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.1, 5.0], [9.0, 9.0]])
    y = np.array([0, 0, 1, 1, 1])
    # Sample 0's nearest other sample is its duplicate 1, not itself.
    _close(knn(x, y, k=1), 1.0)
    _close(knn(x, y, k=1), reference.knn(x, y, k=1))


def test_vote_ties_go_to_the_lowest_class():
    # k = 2 with one neighbour of each class: the lower class id wins (as torch.mode does).
    x = np.array([[0.0], [-1.0], [1.1], [10.0], [11.0], [12.5]])
    y = np.array([1, 0, 2, 5, 5, 5])
    want = reference.knn(x, y, k=2)
    _close(knn(x, y, k=2), want)
    assert want == pytest.approx(3 / 6)  # sample 0 votes {0, 2} -> 0 (wrong); 1 votes {1, 2} -> 1; 2 votes {1, 0} -> 0


def test_binary_f1():
    x, y = make_features(120, 6, 2, seed=3)
    acc = knn(x, y)
    f1 = knn(x, y, binary_f1=True)
    _close(f1, reference.knn(x, y, binary_f1=True))
    predictions_correct = float(acc)
    assert 0 < float(f1) <= 1 and float(f1) != predictions_correct
    # With more than two classes binary_f1 changes nothing (micro-F1 is the accuracy).
    x3, y3 = make_features(120, 6, 3, seed=3)
    _close(knn(x3, y3, binary_f1=True), float(knn(x3, y3)))
    # The positive class is the larger id present, whatever the ids.
    _close(knn(x, y * 7 + 2, binary_f1=True), float(f1))


def test_one_class_and_absent_ids():
    x, y = make_features(60, 5, 3, seed=1)
    _close(knn(x, np.zeros(60, dtype=np.int64)), 1.0)
    _close(knn(x, np.array([0, 4, 9])[y]), float(knn(x, y)))  # ids need not be 0..C-1


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_scale_and_offset(metric):
    x, y = make_features(120, 10, 3, seed=5)
    want = reference.knn(x, y, metric=metric)
    for factor in (1e-200, 1e-30, 1e30, 1e200):
        _close(knn(x * factor, y, metric=metric), want)
    _close(knn(x * factor, y, metric=metric, dtype=torch.float32), want, tol=1e-7)
    if metric == "euclidean":
        _close(knn(x + 1e6, y), want)
    # Columns over six decades, duplicated columns: as the reference.
    spread = x * np.logspace(-3, 3, x.shape[1])
    _close(knn(spread, y, metric=metric), reference.knn(spread, y, metric=metric))
    doubled = np.hstack([x, x])
    _close(knn(doubled, y, metric=metric), reference.knn(doubled, y, metric=metric))


def test_cosine_zero_row():
    x, y = make_features(30, 4, 2, seed=2)
    x[3] = 0.0
    _close(knn(x, y, metric="cosine"), reference.knn(x, y, metric="cosine"))


def test_float32_matches_float64():
    x, y = make_features(200, 16, 4, seed=4)
    want = float(knn(x, y))
    _close(knn(torch.from_numpy(x).float(), torch.from_numpy(y)), want)
    _close(knn(torch.from_numpy(x).float(), torch.from_numpy(y), dtype=torch.float32), want, tol=1e-7)


def test_inputs_not_modified():
    x, y = make_features(50, 6, 3, seed=0)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    xc, yc = xt.clone(), yt.clone()
    knn(xt, yt, metric="cosine")
    knn(xt, yt)
    assert torch.equal(xt, xc) and torch.equal(yt, yc)


def test_bad_options():
    x, y = make_features(20, 3, 2, seed=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn(x, y, k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn(x, y, k=True)
    with pytest.raises(ValueError, match="metric must be one of"):
        knn(x, y, metric="manhattan")
    with pytest.raises(TypeError, match="binary_f1 must be a bool"):
        knn(x, y, binary_f1=1)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        knn(x, y, block_size=0)
    with pytest.raises(ValueError, match="at least k \\+ 1 = 21 samples"):
        knn(x, y, k=20)
    with pytest.raises(ValueError, match="dtype"):
        knn(x, y, dtype=torch.float16)
    with pytest.raises(ValueError, match="samples|rows|disagree"):
        knn(x, y[:-1])
