"""SFDA (Shao et al., ECCV 2022): self-challenging Fisher discriminant analysis.

A regularised Fisher discriminant is fitted to the features; each sample is
then pulled towards the mean of the other classes in proportion to how
unsure the fit is of its class (the self-challenging step, "ConfMix"), the
discriminant is fitted again to the mixed samples, and the score is how
well that second fit predicts the labels.

The Fisher projection of the published code keeps all D eigenvectors V of
S_b v = lambda S_w v (V^T S_w V = I), so its class scores x^T V V^T mu_c are
x^T S_w^-1 mu_c: the between-class scatter cancels. Here S_w^-1 M^T comes
from one Cholesky solve instead of a generalised eigendecomposition.

Passes over the features: their mean, the class means, the within-class
scatter (D x D), the first fit's predictions with the mixed class sums, the
mixed within-class scatter, the second fit's predictions. Each is in row
chunks; memory is O(D^2 + C D + N) besides the features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ._checks import prepare
from ._primitives import add_gram_, add_rows_, gram_full, present_classes, row_chunks
from ._validators import boolean, positive_int
from .scores import Device, Frame, _check_classes, _finite, _resolvable, _resolve, framed, make_frame
from .sums import CONSTANT_COLUMN_EPS

__all__ = ["sfda", "SHRINKAGE_RATE", "MIN_SHRINKAGE", "POWER_ITERATIONS"]

#: The adaptive shrinkage is exp(-SHRINKAGE_RATE * lambda_max(S_w)) ...
SHRINKAGE_RATE = 5.0
#: ... and at least MIN_SHRINKAGE, as published.
MIN_SHRINKAGE = 1e-10
#: Rounds of the published power iteration (two products each) for lambda_max(S_w).
POWER_ITERATIONS = 3


def _shrinkage_option(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"shrinkage must be None (adaptive) or a float in [0, 1], got {value!r}")
    return float(value)


def largest_eigenvalue(a: Tensor, iterations: Optional[int]) -> float:
    """The largest eigenvalue of a symmetric PSD matrix a [D, D].

    ``iterations`` rounds of the published power iteration: from v = a 1,
    u = a v / |a v|, v = a u / |a u| each round, then v^T a u. None, or a
    start that vanishes (a 1 = 0, e.g. features whose rows sum to a constant,
    such as probabilities), gives the
    exact value from an eigendecomposition (the published code's start
    is then round-off, or 0 / 0).
    """
    start = a.sum(1)
    # a 1 = 0 but for the round-off of its sums (at most D eps times the sums of |a|): no direction to start from.
    roundoff = a.shape[0] * torch.finfo(a.dtype).eps * torch.linalg.vector_norm(a.abs().sum(1))
    if iterations is not None and bool(torch.linalg.vector_norm(start) > roundoff):
        v = u = start
        for _ in range(iterations):
            u = a @ v
            u = u / torch.linalg.vector_norm(u)
            v = a @ u
            v = v / torch.linalg.vector_norm(v)
        value = float(v @ (a @ u))
        if math.isfinite(value):
            return value
    return float(torch.linalg.eigvalsh(a)[-1])


def adaptive_shrinkage(within: Tensor, iterations: Optional[int], log2_scale: float) -> float:
    """max(exp(-5 lambda_max), 1e-10) for the within-class covariance ``within`` [D, D].

    ``within`` is of the features scaled by 2**log2_scale; lambda_max is read
    in the features' own units.
    """
    lam = largest_eigenvalue(within, iterations)
    try:
        lam = math.ldexp(lam, -2 * int(log2_scale))  # back to the features' own units
    except OverflowError:
        lam = math.inf
    return max(math.exp(-SHRINKAGE_RATE * lam) if lam < math.inf else 0.0, MIN_SHRINKAGE)


def discriminant(within: Tensor, means: Tensor, priors: Tensor, shrinkage: float) -> Tuple[Tensor, Tensor]:
    """(weights [D, K], bias [K]): class scores x @ weights + bias of the regularised Fisher classifier.

    S = (1 - s) S_w + s (tr S_w / D) I; weights = S^-1 M^T for class means M
    [K, D]; bias_c = -1/2 mu_c^T S^-1 mu_c + log prior_c. One Cholesky
    factorisation; where it fails (S singular to working precision, as with
    a tiny shrinkage in float32), the eigendecomposition of S_w, whose
    shrunk eigenvalues are (1 - s) max(lam, 0) + s tr / D.
    """
    d = within.shape[0]
    mean_eig = within.trace() / d
    shrunk = within * (1.0 - shrinkage)
    shrunk.diagonal().add_(shrinkage * mean_eig)
    factor, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) == 0:
        weights = torch.cholesky_solve(means.T.contiguous(), factor)
    else:
        lam, vec = torch.linalg.eigh(within)
        lam = (1.0 - shrinkage) * lam.clamp_min(0) + shrinkage * mean_eig
        if not bool((lam > 0).all()):
            raise ValueError(
                f"SFDA: the within-class covariance is singular and shrinkage={shrinkage:g} does not regularise "
                "it; give a shrinkage > 0 (or None, the adaptive default)"
            )
        weights = vec @ ((vec.T @ means.T) / lam[:, None])
    bias = -0.5 * (means * weights.T).sum(1) + priors.log()
    return weights, bias


@dataclass
class ClassData:
    """Features in one frame, with labels over the classes present and their sums: where a Fisher fit starts.

    labels: [N] ids 0..K-1 over the K classes present; counts, priors: [K].
    frame: the features' frame (one power of two for all columns);
    chunks: a fresh iterator of (rows, framed rows [R, D]) per call.
    sums, means: [K, D] class sums and means of the framed rows.
    """

    labels: Tensor
    counts: Tensor
    frame: Frame
    chunks: Callable[[], Iterator[Tuple[slice, Tensor]]]
    sums: Tensor
    means: Tensor
    priors: Tensor


def class_data(
    f: Tensor, targets: Tensor, num_classes: int, dtype: torch.dtype, magnitude: Optional[float], name: str,
    *, two_classes: bool = False,
) -> ClassData:
    """Features f [N, D] and class ids [N] framed and summed per class present, as SFDA and ETran's LDA take them.

    ``two_classes``: raise ValueError (naming ``name``) for fewer than two
    classes present, before any pass over the features.
    """
    n, d = f.shape
    y, counts = present_classes(targets, num_classes, dtype)
    k = counts.shape[0]
    if two_classes and k < 2:
        raise ValueError(f"{name} needs at least two classes in labels, got {k}")
    # One power of two for all columns: the shrinkage target (tr S_w / D) I is not per column.
    frame = make_frame(f, dtype, per_column=False, power=2, largest=magnitude)
    _resolvable(frame, dtype, 2, name)
    chunks: Callable[[], Iterator[Tuple[slice, Tensor]]] = partial(
        row_chunks, f, dtype, partial(framed, dtype=dtype, shift=frame.shift, scale=frame.scale)
    )
    priors = counts / n
    sums = torch.zeros(k, d, dtype=dtype, device=f.device)
    for rows, x in chunks():
        add_rows_(sums, y[rows], x)
    return ClassData(y, counts, frame, chunks, sums, sums / counts[:, None], priors)


def within_covariance(
    chunks: Iterator[Tuple[slice, Tensor]], labels: Tensor, sums: Tensor, means: Tensor, n: int, name: str, why: str
) -> Tensor:
    """The within-class covariance [D, D] (normalised by N) of the chunked rows, given class sums and means [K, D].

    Raises ValueError (``name``: ``why``) when it is round-off of the second
    moment it is taken from: features constant within every class.
    """
    within = _within_scatter(chunks, labels, means) / n
    # The within-class spread, next to the round-off of the second moment it is taken from.
    second = (sums * means).sum() / n + within.trace()
    if float(within.trace()) <= CONSTANT_COLUMN_EPS * torch.finfo(within.dtype).eps * float(second):
        raise ValueError(
            f"{name}: the features are constant within every class, so the within-class covariance is 0 and {why}"
        )
    return within


def _within_scatter(chunks: Iterator[Tuple[slice, Tensor]], labels: Tensor, means: Tensor) -> Tensor:
    """sum (x - mu_y)(x - mu_y)^T [D, D] over the rows the chunks yield: centred per class, so no cancellation."""
    d = means.shape[1]
    gram = torch.zeros(d, d, dtype=means.dtype, device=means.device)
    for rows, x in chunks:
        add_gram_(gram, x - means[labels[rows]])
    return gram_full(gram)


def sfda(
    features: Any,
    labels: Any,
    *,
    shrinkage: Optional[float] = None,
    power_iterations: Optional[int] = POWER_ITERATIONS,
    log_likelihood: bool = True,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """SFDA (Shao et al., ECCV 2022): self-challenging Fisher discriminant analysis.

    1. Fit the regularised Fisher classifier: class means mu_c, priors
       n_c / N, within-class covariance S_w = sum_c (n_c / N) cov_c (each
       normalised by n_c), shrunk to S = (1 - s) S_w + s (tr S_w / D) I with
       s = max(exp(-5 lambda_max(S_w)), 1e-10); p(c | x) = softmax_c(x^T S^-1
       mu_c - 1/2 mu_c^T S^-1 mu_c + log prior_c).
    2. Self-challenge: w_i = softmax(p(. | x_i))_{y_i} (the probabilities
       softened by a second softmax, as published) and x_i <- w_i x_i +
       (1 - w_i) m_{y_i}, m_c the average of the other classes' means.
    3. Fit again on the mixed samples with the same s; the score is the
       average log-likelihood (1/N) sum_i log p(y_i | x_i) of that fit.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids (only the classes that occur count).
        shrinkage: s in [0, 1]; None (default): the adaptive s above.
        power_iterations: rounds of the published power iteration for
            lambda_max(S_w) (default 3, as published); None: the exact
            eigenvalue. Unused when ``shrinkage`` is given.
        log_likelihood: True (default): the paper's average log-likelihood.
            False: the average probability (1/N) sum_i p(y_i | x_i), which the
            published code returns ("the log function is ignored in case of
            instability"; here the log comes from a stable log-softmax).
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor, <= 0 (in (0, 1] with ``log_likelihood=False``). Larger
        is better. Invariant to shifting the features; not to scaling them
        (the adaptive shrinkage reads lambda_max in the features' units).
        Raises ValueError for fewer than two classes, or features constant
        within every class.
    """
    dtype, device = _resolve(dtype, device)
    shrinkage = _shrinkage_option(shrinkage)
    power_iterations = positive_int(power_iterations, "power_iterations", optional=True)
    log_likelihood = boolean(log_likelihood, "log_likelihood")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * d, "SFDA's class means (C x D)")
    f, n, d = inputs.features, inputs.num_samples, inputs.num_features
    with torch.no_grad():
        data = class_data(f, inputs.targets, inputs.num_columns, dtype, inputs.magnitude, "SFDA", two_classes=True)
        y, counts, frame, chunks, sums, means, priors = (
            data.labels, data.counts, data.frame, data.chunks, data.sums, data.means, data.priors
        )
        k = counts.shape[0]
        within = within_covariance(chunks(), y, sums, means, n, "SFDA", "the Fisher discriminant is undefined")
        if shrinkage is None:
            shrinkage = adaptive_shrinkage(within, power_iterations, float(frame.log2_scale[0]))
        weights, bias = discriminant(within, means, priors, shrinkage)

        # Self-challenge: each sample's softened confidence in its own class.
        others = (means.sum(0) - means) / (k - 1)
        confidence = torch.empty(n, dtype=dtype, device=f.device)
        mixed_sums = torch.zeros(k, d, dtype=dtype, device=f.device)
        for rows, x in chunks():
            yy = y[rows]
            soft = torch.softmax(torch.softmax(x @ weights + bias, 1), 1)
            w = soft.gather(1, yy[:, None])
            confidence[rows] = w[:, 0]
            add_rows_(mixed_sums, yy, w * x + (1 - w) * others[yy])

        def mixed() -> Iterator[Tuple[slice, Tensor]]:
            for rows, x in chunks():
                w = confidence[rows, None]
                yield rows, w * x + (1 - w) * others[y[rows]]

        mixed_means = mixed_sums / counts[:, None]
        mixed_within = _within_scatter(mixed(), y, mixed_means) / n
        weights, bias = discriminant(mixed_within, mixed_means, priors, shrinkage)
        total = torch.zeros((), dtype=dtype, device=f.device)
        for rows, x in mixed():
            own = torch.log_softmax(x @ weights + bias, 1).gather(1, y[rows, None])
            total += own.sum() if log_likelihood else own.exp().sum()
        return _finite(total / n, "SFDA", frame.size)
