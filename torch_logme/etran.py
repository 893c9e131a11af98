"""ETran (Gholami et al., ICCV 2023): an energy term and an LDA term, combined across the pool of models.

For classification the published code (mgholamikn/ETran: ``metrics.Energy_Score``,
``metrics.LDA_Score``, combined in ``tw.py``) scores each model by two terms:

    energy  the mean of the lowest ``energy_percent`` % (0.5 %) of the
            per-sample energies logsumexp_j f_ij of the features themselves
    lda     the mean probability that a shrinkage LDA classifier, fitted to
            all samples, gives each sample's own class

and ranks the models by 0.15 x energy + 0.85 x lda, each term min-max
normalised across the models (``combine``). The paper's regression (SVD)
term is for object detection; the published classification pipeline does
not compute it, and neither does this module.

``etran`` returns the terms [2] of one model; ``combine(terms [M, 2])`` the
published scores [M] of M models.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_class_count, prepare
from ._options import compute_options
from ._primitives import add_gram_, class_counts, class_sums, gram_full, row_chunks
from .scores import framed, work_dtype

__all__ = ["etran", "combine", "TERMS", "WEIGHTS"]

Device = Union[str, torch.device, None]

#: The per-model terms ``etran`` returns, in order.
TERMS = ("energy", "lda")
#: The published weights of the min-max normalised terms (``tw.py``).
WEIGHTS = (0.15, 0.85)
#: Power-iteration rounds of the published estimate of the largest within-class eigenvalue.
POWER_ROUNDS = 3
#: Floor of the LDA's shrinkage, as published.
MIN_SHRINKAGE = 1e-10


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


def _largest_eigenvalue(a: Tensor) -> Tensor:
    """The published estimate of the largest eigenvalue of a symmetric PSD a [D, D].

    Three rounds of two power-iteration steps from the row sums, then the
    Rayleigh-like quotient x^T a y of the last two iterates. A zero iterate
    (a = 0, or row sums in its null space) gives 0 where the published
    division gives NaN.
    """
    def unit(v: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(v)
        return torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(v))

    x = a.sum(1)
    y = x
    for _ in range(POWER_ROUNDS):
        y = unit(a @ x)
        x = unit(a @ y)
    return x @ (a @ y)


def _lda(f: Tensor, y: Tensor, c: int, dtype: torch.dtype, legacy: bool) -> Tensor:
    """Mean LDA probability of each sample's own class, features f [N, D], labels y [N] in 0..c-1.

    Classes absent from ``y`` take no part (the published code's classes are
    those present). The arithmetic is on features shifted by their mean:
    the LDA's probabilities do not depend on a shift.
    """
    n, d = f.shape
    shift = f.sum(0, dtype=work_dtype(f.dtype, dtype)) / n
    convert = partial(framed, dtype=dtype, shift=shift)
    counts = class_counts(y, c, dtype)
    present = counts > 0
    sums = torch.zeros(c, d, dtype=dtype, device=f.device)
    for rows, x in row_chunks(f, dtype, convert):
        sums += class_sums(x, y[rows], c)
    means = sums / counts.clamp_min(1)[:, None]  # [C, D]
    log_prior = torch.where(present, counts / n, torch.ones_like(counts)).log()
    if legacy:
        # The published eigen-decomposition leaves coef = means V V^T with V orthonormal: the identity.
        coef = means.T
    else:
        # Within-class covariance sum_c (n_c / N) cov_c = the scatter of the rows about their class means / N.
        scatter = torch.zeros(d, d, dtype=dtype, device=f.device)
        for rows, x in row_chunks(f, dtype, convert):
            add_gram_(scatter, x - means[y[rows]])
        within = gram_full(scatter) / n
        if not bool(torch.isfinite(within).all()):
            raise ValueError(
                f"ETran's LDA: the within-class covariance of these features exceeds the range of {dtype}; "
                "divide the features by a constant"
            )
        shrinkage = _largest_eigenvalue(within).mul(-5).exp().clamp_min(MIN_SHRINKAGE)
        mean_var = within.diagonal().sum() / d
        shrunk = within * (1 - shrinkage)
        shrunk.diagonal().add_(shrinkage * mean_var)
        lower, info = torch.linalg.cholesky_ex(shrunk)
        if int(info) != 0:
            raise ValueError(
                "ETran's LDA: the shrunk within-class covariance is singular (every class's features are "
                "constant within the class); the LDA term needs within-class variation"
            )
        coef = torch.cholesky_solve(means.T, lower)  # [D, C]: S^-1 mu_c
    bias = torch.where(present, log_prior - 0.5 * (means * coef.T).sum(1), torch.full_like(counts, -math.inf))
    total = torch.zeros((), dtype=dtype, device=f.device)
    for rows, x in row_chunks(f, dtype, convert):
        log_p = torch.log_softmax(x @ coef + bias, 1)
        total += log_p.gather(1, y[rows, None]).exp().sum()
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

    Combine the terms of several models with ``combine`` (the registry's
    ``SCORES["etran"].combine``).

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        energy_percent: the percentage of samples (lowest energies) the
            energy term averages, in (0, 100] (0.5, as published).
        legacy_lda: see above (False).
        dtype, device: compute precision (float64) and device.

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
        terms = torch.stack([_energy(f, percent, options.dtype), _lda(f, y, c, options.dtype, legacy_lda)])
        if not bool(torch.isfinite(terms).all()):
            raise ValueError(
                f"ETran came out {terms.tolist()} for features of magnitude up to {inputs.magnitude:.3g}: "
                f"their sums exceed the range of {options.dtype}; divide the features by a constant"
            )
        return terms


def combine(terms: Tensor, weights: Sequence[float] = WEIGHTS) -> Tensor:
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

