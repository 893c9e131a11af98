"""ETran (Gholami et al., ICCV 2023): an energy term and an LDA term, combined across the pool of models.

For classification the published code (mgholamikn/ETran: ``metrics.Energy_Score``,
``metrics.LDA_Score``, combined in ``tw.py``) scores each model by two terms:

    energy  the mean of the lowest ``energy_percent`` % (0.5 %) of the
            per-sample energies logsumexp_j f_ij of the features themselves
    lda     the mean probability that a shrinkage LDA classifier, fitted to
            all samples, gives each sample's own class

and ranks the models by 0.15 x energy + 0.85 x lda, each term min-max
normalised across the models (``etran_combine``). The paper's regression (SVD)
term is for object detection; the published classification pipeline does
not compute it, and neither does this module.

``etran`` returns the terms [2] of one model; ``etran_combine(terms [M, 2])``
the published scores [M] of M models.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_class_count, prepare
from ._options import compute_options
from ._primitives import row_chunks
from .sfda import POWER_ITERATIONS, adaptive_shrinkage, class_data, discriminant, within_covariance

__all__ = ["etran", "etran_combine", "energy_count", "TERMS", "WEIGHTS"]

Device = Union[str, torch.device, None]

#: The per-model terms ``etran`` returns, in order.
TERMS = ("energy", "lda")
#: The published weights of the min-max normalised terms (``tw.py``).
WEIGHTS = (0.15, 0.85)


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ValueError(f"energy_percent must be a number in (0, 100], got {value!r}")
    return float(value)


def energy_count(n: int, percent: float) -> int:
    """How many of n samples the energy term averages: int(10 percent) n // 1000, at least 1.

    The published count, which truncates ``percent`` to tenths; it is 0 for
    N < 200 at 0.5 %, where the published code averages nothing (NaN).
    """
    return max(1, int(percent * 10) * n // 1000)


def _energy(f: Tensor, percent: float, dtype: torch.dtype) -> Tensor:
    """Mean of the lowest ``energy_count`` of the row energies logsumexp_j f_ij of f [N, D]."""
    n = f.shape[0]
    energies = torch.empty(n, dtype=dtype, device=f.device)
    for rows, chunk in row_chunks(f, dtype):
        energies[rows] = torch.logsumexp(chunk, 1)
    return energies.topk(energy_count(n, percent), largest=False, sorted=False).values.mean()


def _lda(f: Tensor, targets: Tensor, num_classes: int, dtype: torch.dtype, legacy: bool,
         magnitude: Optional[float]) -> Tensor:
    """Mean LDA probability of each sample's own class: features f [N, D], labels [N] in 0..num_classes-1.

    SFDA's regularised Fisher classifier (``torch_logme.sfda``: the same
    within-class covariance, adaptive shrinkage and discriminant), fitted
    once; ``legacy``: the identity in place of S^-1. Classes absent from the
    labels take no part. The sums are of the features shifted by their mean
    (the probabilities do not depend on a shift) and scaled by a power of
    two, undone where the score reads the features' own units.
    """
    n = f.shape[0]
    data = class_data(f, targets, num_classes, dtype, magnitude, "ETran")
    y, chunks, sums, means, priors = data.labels, data.chunks, data.sums, data.means, data.priors
    log2_scale = float(data.frame.log2_scale[0])
    if legacy:
        # The published eigenvectors are orthonormal, so its coefficients mu V V^T are the means:
        # class scores x . mu_c - |mu_c|^2 / 2 + log prior_c, in the features' own units.
        unscale = torch.full((), -log2_scale, dtype=dtype, device=f.device)
        own = torch.ldexp(means, unscale)
        weights = torch.ldexp(own, unscale).T
        bias = -0.5 * (own * own).sum(1) + priors.log()
    else:
        within = within_covariance(chunks(), y, sums, means, n, "ETran", "the LDA term is undefined "
                                   "(legacy_lda=True, the published nearest-mean form, needs none)")
        shrinkage = adaptive_shrinkage(within, POWER_ITERATIONS, log2_scale)
        weights, bias = discriminant(within, means, priors, shrinkage)
    total = torch.zeros((), dtype=dtype, device=f.device)
    for rows, x in chunks():
        total += torch.log_softmax(x @ weights + bias, 1).gather(1, y[rows, None]).exp().sum()
    return total / n


def etran(
    features: Any,
    labels: Any,
    *,
    energy_percent: float = 0.5,
    legacy_lda: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """ETran's per-model terms (Gholami et al., ICCV 2023): [energy, lda].

    * energy: the mean of the lowest ``energy_percent`` % of the per-sample
      energies logsumexp_j f_ij, the features taken as logits (the
      published count: int(10 percent) N // 1000, here at least 1).
    * lda: (1/N) sum_i p(y_i | f_i) of a linear discriminant fitted to all
      samples, p(c | f) = softmax_c(f^T S^-1 mu_c - mu_c^T S^-1 mu_c / 2 +
      log pi_c), with the class means mu_c, priors pi_c = n_c / N and the
      shrunk within-class covariance S = (1 - s) S_w + s (tr S_w / D) I,
      S_w = sum_c pi_c cov_c, s = max(exp(-5 lambda), 1e-10) and lambda the
      published three-round power-iteration estimate of S_w's largest
      eigenvalue.

    ``legacy_lda=True`` reproduces the published code's LDA: it takes the
    eigenvectors of the non-symmetric S^-1 S_b with a symmetric solver
    (``numpy.linalg.eigh``, which reads one triangle), all D of them,
    orthonormal, so its coefficients mu V V^T are the class means themselves:
    S^-1 becomes the identity and p(c | f) = softmax_c(f^T mu_c - |mu_c|^2 / 2
    + log pi_c), a nearest-mean classifier that ignores the covariance. The
    default is the LDA the paper describes, which the method it builds on
    (SFDA) computes with the generalised eigenproblem, V V^T = S^-1.

    Combine the terms of several models with ``etran_combine`` (the
    registry's ``SCORES["etran"].combine``).

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        energy_percent: the percentage of samples (lowest energies) the
            energy term averages, in (0, 100] (0.5, as published).
        legacy_lda: see above (False).
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        [2] tensor: (energy, lda). Larger is better for both. The lda term is
        in (0, 1] and invariant to shifting the features; the energy term is
        not (it reads the features as logits).
    """
    options = compute_options(dtype=dtype, device=device)
    percent = _percent(energy_percent)
    if not isinstance(legacy_lda, bool):
        raise TypeError(f"legacy_lda must be a bool, got {type(legacy_lda).__name__}")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=options.device)
    c, d, n = inputs.num_columns, inputs.num_features, inputs.num_samples
    check_class_count(c, n, c * d, "ETran's class means (C x D)")
    with torch.no_grad():
        f, y = inputs.features, inputs.targets
        lda = _lda(f, y, c, options.dtype, legacy_lda, inputs.magnitude)
        terms = torch.stack([_energy(f, percent, options.dtype), lda])
        if not bool(torch.isfinite(terms).all()):
            raise ValueError(
                f"ETran came out {terms.tolist()} for features of magnitude up to {inputs.magnitude:.3g}: "
                f"their sums exceed the range of {options.dtype}; divide the features by a constant"
            )
        return terms


def etran_combine(terms: Tensor, weights: Sequence[float] = WEIGHTS) -> Tensor:
    """The published ETran scores [M] of M models from their terms [M, 2] (``etran``'s output, stacked).

    Each term is min-max normalised across the models, (t - min) / (max -
    min), then weighted, 0.15 energy + 0.85 lda, as ``tw.py`` does. A term
    equal for every model (one model, say) normalises to 0 here, where the
    published division gives NaN.
    """
    if not isinstance(terms, Tensor):
        raise TypeError(f"terms must be a tensor [M, {len(TERMS)}], got {type(terms).__name__}")
    if terms.dim() != 2 or terms.shape[1] != len(TERMS) or terms.shape[0] < 1:
        raise ValueError(f"terms must have shape [M, {len(TERMS)}] (models x {', '.join(TERMS)}), "
                         f"got {tuple(terms.shape)}")
    if len(weights) != len(TERMS):
        raise ValueError(f"weights must have {len(TERMS)} entries, got {len(weights)}")
    low, high = terms.amin(0), terms.amax(0)
    spread = high - low
    scaled = torch.where(spread > 0, (terms - low) / torch.where(spread > 0, spread, torch.ones_like(spread)),
                         torch.zeros_like(terms))
    return scaled @ torch.tensor(weights, dtype=terms.dtype, device=terms.device)

