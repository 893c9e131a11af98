"""ETran: its terms against the numpy reference, its published combination across models, edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_logme import SCORES, accumulator, etran, reference
from torch_logme.etran import TERMS, WEIGHTS, energy_count, etran_combine

from conftest import make_features

RTOL = 1e-9


def _close(a, b, rtol=RTOL, atol=1e-12) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("shape", [(240, 12, 4), (60, 60, 3), (40, 90, 2), (1000, 30, 6)])
def test_matches_reference(shape, legacy):
    for seed in (1, 2):
        x, y = make_features(*shape, seed=seed)
        got = etran(x, y, legacy_lda=legacy)
        assert got.shape == (2,) and got.dtype == torch.float64
        assert _close(got.numpy(), reference.etran(x, y, legacy_lda=legacy))


def test_bundled_data_sets():
    datasets = pytest.importorskip("sklearn.datasets")
    for loader in (datasets.load_digits, datasets.load_breast_cancer, datasets.load_wine):
        data = loader()
        x, y = data.data.astype(np.float64), data.target.astype(np.int64)
        for legacy in (False, True):
            assert _close(etran(x, y, legacy_lda=legacy).numpy(), reference.etran(x, y, legacy_lda=legacy))


def test_legacy_lda_is_the_nearest_mean_classifier():
    x, y = make_features(300, 5, 3, seed=3)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    logits = x @ means.T - 0.5 * (means ** 2).sum(1) + np.log(np.bincount(y) / 300)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    assert _close(etran(x, y, legacy_lda=True)[1], prob[np.arange(300), y].mean())


def _published_combination(energy: dict, lda: dict) -> dict:
    """A direct transcription of the published tw.py: min-max each score dict over models, then 0.15 / 0.85."""
    def scale(score: dict) -> dict:
        low, high = 10e10, -10e10
        for key in score:
            if score[key] < low:
                low = score[key]
            if score[key] > high:
                high = score[key]
        return {key: (score[key] - low) / (high - low) for key in score}

    energy, lda = scale(dict(energy)), scale(dict(lda))
    return {key: energy[key] * 0.15 + lda[key] * 0.85 for key in energy}


def test_combine_is_the_published_combination():
    x, y = make_features(400, 16, 4, seed=4)
    rng = np.random.default_rng(0)
    # Five "models": the features through different random maps.
    models = {f"m{i}": np.tanh(x @ rng.standard_normal((16, 8 + 4 * i)) / 4) * (1 + i) for i in range(5)}
    terms = torch.stack([etran(f, y) for f in models.values()])
    got = etran_combine(terms)
    want = _published_combination({k: float(t[0]) for k, t in zip(models, terms)},
                                  {k: float(t[1]) for k, t in zip(models, terms)})
    assert _close(got.numpy(), np.array([want[k] for k in models]), atol=1e-15)
    assert _close(got.numpy(), reference.etran_combine(terms.numpy()), atol=1e-15)
    assert SCORES["etran"].combine(terms).equal(got)
    assert list(models)[int(got.argmax())] == max(want, key=want.get)


def test_combine_edge_cases():
    terms = torch.tensor([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]], dtype=torch.float64)
    # A term equal for every model normalises to 0 (the published division gives NaN).
    assert etran_combine(terms).tolist() == [0.0, 0.075, 0.15]
    assert etran_combine(terms[:1]).tolist() == [0.0]
    assert torch.allclose(etran_combine(terms, weights=(1.0, 0.0)), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        etran_combine(terms[:, :1])
    with pytest.raises(TypeError):
        etran_combine(terms.numpy())
    with pytest.raises(ValueError, match="weights"):
        etran_combine(terms, weights=(1.0,))


def test_energy_count_is_the_published_count():
    assert energy_count(1000, 0.5) == 5 and energy_count(1999, 0.5) == 9
    assert energy_count(1000, 0.55) == 5  # tenths of a percent, truncated
    assert energy_count(150, 0.5) == 1  # published: 0 samples, a NaN mean
    assert energy_count(1000, 100) == 1000


def test_shift_scale_classes_and_degenerate_features():
    x, y = make_features(300, 10, 3, seed=5)
    base = etran(x, y)
    shifted = etran(x + 1e6, y)
    # logsumexp(f + c) = logsumexp(f) + c; the LDA does not see a shift.
    assert _close(shifted[0] - 1e6, base[0], rtol=1e-6) and _close(shifted[1], base[1], rtol=1e-8)
    # Absent class ids take no part.
    assert _close(etran(x, np.array([0, 3, 7])[y]).numpy(), base.numpy())
    # One class: every probability is 1.
    assert float(etran(x, np.zeros(300, dtype=np.int64))[1]) == pytest.approx(1.0, abs=1e-15)
    # Duplicated columns (a singular within-class covariance, shrunk) and columns over six decades.
    for f in (np.concatenate([x, x[:, :4]], 1), x * np.logspace(-3, 3, 10)):
        assert _close(etran(f, y).numpy(), reference.etran(f, y))
    # Every class constant: no within-class variation for the LDA (the legacy one needs none).
    rows = np.repeat(np.eye(3), 5, axis=0)
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(ValueError, match="within-class"):
        etran(rows, labels)
    assert float(etran(rows, labels, legacy_lda=True)[1]) > 0
    # Huge features: the sums are scaled by a power of two (the shrinkage reads lambda in their own units).
    huge = etran(x * 1e300, y)
    assert bool(torch.isfinite(huge).all()) and 0 < float(huge[1]) <= 1
    assert _close(etran(x * 1e30, y)[1], reference.etran(x * 1e30, y)[1])


def test_float32_inputs_and_compute():
    x, y = make_features(300, 10, 3, seed=6)
    x32 = x.astype(np.float32)
    assert _close(etran(torch.from_numpy(x32), y).numpy(), reference.etran(x32.astype(np.float64), y))
    low = etran(x32, y, dtype=torch.float32)
    assert low.dtype == torch.float32
    assert _close(low.numpy(), reference.etran(x32.astype(np.float64), y), rtol=1e-4)


def test_inputs_are_not_modified():
    x, y = make_features(100, 6, 2, seed=7)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    etran(xt, yt)
    assert np.array_equal(xt.numpy(), x) and np.array_equal(yt.numpy(), y)


def test_bad_options():
    x, y = make_features(100, 6, 2, seed=8)
    for kwargs, error in [
        (dict(energy_percent=0), ValueError), (dict(energy_percent=101), ValueError),
        (dict(energy_percent=True), ValueError), (dict(legacy_lda=1), TypeError),
        (dict(dtype=torch.int64), (ValueError, TypeError)),
    ]:
        with pytest.raises(error):
            etran(x, y, **kwargs)


def test_registered_as_a_pooled_score_without_accumulator():
    spec = SCORES["etran"]
    assert spec.fn is etran and spec.pooled and spec.terms == TERMS == ("energy", "lda")
    assert spec.combine is etran_combine and WEIGHTS == (0.15, 0.85) and spec.larger_is_better
    assert not spec.streams
    with pytest.raises(ValueError, match="'etran' does not stream"):
        accumulator("etran", 8)


def test_devices_agree(device):
    x, y = make_features(300, 12, 4, seed=9)
    xt = torch.from_numpy(x).to(device, torch.float32)
    got = etran(xt, torch.from_numpy(y).to(device))
    assert got.device.type == torch.device(device).type
    assert _close(got.cpu().numpy(), reference.etran(xt.double().cpu().numpy(), y))
