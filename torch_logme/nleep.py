"""NLEEP (Li et al., CVPR 2021): LEEP of a Gaussian mixture's posteriors over PCA-reduced features.

Three steps, as the published code (TencentARC/SFDA, ``metrics.NLEEP``) takes them:

1. PCA: the fewest principal components whose cumulative share of the
   variance exceeds ``variance`` (0.8), scikit-learn's rule for a fractional
   ``n_components``; each component's sign makes its largest entry positive,
   as scikit-learn's ``svd_flip`` does, so the coordinates are its own.
2. A Gaussian mixture with ``components_per_class`` x C components (C the
   classes present), full covariances, fitted by EM as scikit-learn's
   ``GaussianMixture`` defaults do: ``reg_covar`` 1e-6 added to each
   covariance's diagonal, EM until the mean log-likelihood changes by less
   than ``tol`` (1e-3) or ``max_iter`` (100) iterations, one initialisation.
3. LEEP of the mixture's posteriors p(z | x) [N, K] against the labels.

The EM is batched over components: each step is a few batched products over
row blocks of [K, B, d] temporaries. The one loop over components is the
k-means++ seeding of the default initialisation, where each centre is drawn
given the previous ones.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import as_tensor, check_class_count, prepare
from ._options import compute_options
from ._primitives import add_gram_, class_counts, class_sums, gram_full, itemsize, row_chunks
from ._validators import positive_float, positive_int
from .scores import framed, leep_from_probs, make_frame

__all__ = ["nleep", "pca_reduce", "kmeans_labels", "canonical_order", "KMEANS_MAX_ITER", "KMEANS_TOL"]

Device = Union[str, torch.device, None]

#: Lloyd iterations of the default initialisation's k-means, and its tolerance
#: on the squared shift of the centres relative to the mean column variance
#: (scikit-learn's KMeans defaults).
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
#: Bytes of one [K, B, d] temporary of a row block of the E and M steps.
BLOCK_BYTES = 32 << 20

_CHOLESKY_FAILED = (
    "NLEEP: a mixture component's covariance is not positive definite (a component collapsed onto too few "
    "samples, or the features are too large for reg_covar); raise reg_covar, lower components_per_class, or "
    "scale the features"
)


@dataclass
class _Mixture:
    """Mixture parameters: weights [K], means [K, d], Cholesky factors of the precisions [K, d, d].

    ``precision_chol[k]`` is the upper-triangular P with P P^T = inverse covariance
    (scikit-learn's ``precisions_cholesky_``): ||(x - mu) P||^2 is the Mahalanobis distance.
    """

    weights: Tensor
    means: Tensor
    precision_chol: Tensor


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    checked = positive_int(value, name)
    assert checked is not None  # not optional
    return checked


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be a non-negative int, got {value!r}")
    return value


def _rows_per_block(k: int, d: int, dtype: torch.dtype) -> int:
    return max(1, BLOCK_BYTES // max(1, k * d * itemsize(dtype)))


# -- PCA ---------------------------------------------------------------------------


def _pca(f: Tensor, variance: float, dtype: torch.dtype, largest: Optional[float]) -> Tensor:
    """The principal coordinates [N, d] of features f [N, D] that keep ``variance`` of the variance.

    Centred and scaled by a power of two (``make_frame``) for the
    decomposition; the coordinates are scaled back exactly.
    """
    n, dim = f.shape
    frame = make_frame(f, dtype, per_column=False, power=2, centre=True, largest=largest)
    convert = partial(framed, dtype=dtype, shift=frame.shift, scale=frame.scale, centre=frame.centre)
    if n > dim:  # primal: the D x D scatter matrix
        gram = torch.zeros(dim, dim, dtype=dtype, device=f.device)
        for _, x in row_chunks(f, dtype, convert):
            add_gram_(gram, x)
        lam, vec = torch.linalg.eigh(gram_full(gram))
        lam, vec = lam.flip(0), vec.flip(1)
        whole = None
    else:  # dual: the N x N Gram matrix; directions X^T u / sqrt(lam)
        whole = convert(f)
        lam, vec = torch.linalg.eigh(whole @ whole.T)
        lam, vec = lam.flip(0), vec.flip(1)
    lam = lam.clamp_min(0)
    total = lam.sum()
    if not bool(total > 0):
        raise ValueError("NLEEP: the features have no variance (every column is constant); PCA keeps nothing")
    share = torch.cumsum(lam / total, 0)
    target = torch.tensor([variance], dtype=share.dtype, device=share.device)
    keep = min(int(torch.searchsorted(share, target, right=True)) + 1, lam.shape[0])
    if whole is None:
        basis = vec[:, :keep]
    else:
        basis = whole.T @ vec[:, :keep] / lam[:keep].sqrt()
    # Sign: each direction's largest entry positive (scikit-learn's svd_flip, v-based).
    top = basis.abs().argmax(0)
    basis = basis * torch.sign(basis[top, torch.arange(keep, device=basis.device)])
    if whole is not None:
        out = whole @ basis
    else:
        out = torch.empty(n, keep, dtype=dtype, device=f.device)
        for rows, x in row_chunks(f, dtype, convert):
            out[rows] = x @ basis
    if frame.scale is not None:  # one power of two for all columns: exact
        out /= frame.scale[0].to(dtype)
    size = float(out.abs().amax())
    # The M step sums squares of the coordinates over N samples.
    if not size < math.sqrt(torch.finfo(dtype).max / 4 / n):
        raise ValueError(
            f"NLEEP: principal coordinates of magnitude up to {size:.3g} make the mixture's covariances overflow "
            f"{dtype}; divide the features by a constant (NLEEP's reg_covar is absolute, so the score depends on "
            "the features' scale)"
        )
    return out


def pca_reduce(
    features: Any,
    *,
    variance: float = 0.8,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """The PCA coordinates that ``nleep`` fits its mixture to (and that a parameter ``init`` is given in).

    Args:
        features: [N, D] tensor or numpy array, any device.
        variance: the share of the variance to keep, in (0, 1): the fewest
            components whose cumulative share exceeds it.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        [N, d] the centred features projected on the leading principal
        directions, each signed so that its largest entry is positive: the
        coordinates scikit-learn's ``PCA(n_components=variance)`` gives, up to
        round-off.
    """
    options = compute_options(dtype=dtype, device=device)
    variance = _fraction(variance, "variance")
    f = as_tensor(features, "features")
    dummy = torch.zeros(f.shape[0] if f.dim() > 0 else 0, dtype=torch.int64)
    inputs = prepare(f, dummy, regression=False, num_classes=None, device=options.device)
    with torch.no_grad():
        return _pca(inputs.features, variance, options.dtype, inputs.magnitude)


# -- the default initialisation: seeded k-means ----------------------------------------


def _sq_distances(x: Tensor, x_sq: Tensor, centres: Tensor) -> Tensor:
    """[B, K] squared distances of rows x [B, d] (squared norms x_sq [B]) to centres [K, d]."""
    return (x_sq[:, None] - 2 * (x @ centres.T) + (centres * centres).sum(1)[None]).clamp_min_(0)


def _nearest(x: Tensor, x_sq: Tensor, centres: Tensor) -> Tensor:
    """[N] int64: the index of each row's nearest centre, in row blocks of [B, K]."""
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    step = _rows_per_block(centres.shape[0], 1, x.dtype)
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        labels[rows] = _sq_distances(x[rows], x_sq[rows], centres).argmin(1)
    return labels


def canonical_order(x: Tensor) -> Tensor:
    """[N] int64: the permutation that sorts the rows of x [N, d] lexicographically (column 0 first).

    Only identical rows keep their relative order, and those are
    interchangeable: the seeded initialisation, drawn over rows in this
    order, does not depend on the order the samples came in.
    """
    order = torch.arange(x.shape[0], device=x.device)
    for j in range(x.shape[1] - 1, -1, -1):  # stable sorts, least significant column first
        order = order[torch.sort(x[order, j], stable=True).indices]
    return order


def kmeans_labels(x: Tensor, k: int, rng: np.random.Generator, *, max_iter: int = KMEANS_MAX_ITER,
                  tol: float = KMEANS_TOL) -> Tensor:
    """Cluster labels [N] of rows x [N, d]: greedy k-means++ seeding, then Lloyd iterations.

    The rows are taken in ``canonical_order``, so the clusters do not depend
    on the order of the rows. The random numbers come from ``rng`` (numpy),
    drawn in one go: the first centre ``rng.integers(N)``, then
    ``rng.random((k - 1, 2 + int(log k)))``.
    Each later centre is the best (least potential) of that many candidates
    drawn with probability proportional to the squared distance to the
    centres so far (Arthur & Vassilvitskii 2007, greedy as scikit-learn).
    Lloyd: centres to their clusters' means (an empty cluster keeps its
    centre), rows to their nearest centre, until no label changes, the
    centres' squared shift is at most ``tol`` x the mean column variance, or
    ``max_iter`` updates.
    """
    order = canonical_order(x)
    x = x[order]
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(rng.integers(n))
    draws = torch.from_numpy(rng.random((max(k - 1, 0), trials))).to(device=x.device, dtype=x.dtype)
    x_sq = (x * x).sum(1)
    chosen = torch.empty(k, dtype=torch.int64, device=x.device)
    chosen[0] = first
    closest = _sq_distances(x, x_sq, x[first:first + 1])[:, 0]
    # The one loop over components: k-means++ draws each centre given the previous ones.
    # Everything stays on the device (no host read per centre).
    for c in range(1, k):
        candidates = torch.searchsorted(torch.cumsum(closest, 0), draws[c - 1] * closest.sum()).clamp_max_(n - 1)
        dist = torch.minimum(_sq_distances(x[candidates], x_sq[candidates], x).T, closest[:, None])  # [N, T]
        best = dist.sum(0).argmin()
        closest = dist[:, best]
        chosen[c] = candidates[best]
    centres = x[chosen]
    threshold = tol * float(x.var(0, unbiased=False).mean())
    labels = _nearest(x, x_sq, centres)
    for _ in range(max_iter):
        counts = class_counts(labels, k, x.dtype)
        means = class_sums(x, labels, k) / counts.clamp_min(1)[:, None]
        moved = torch.where(counts[:, None] > 0, means, centres)
        shift = ((moved - centres) ** 2).sum()
        centres = moved
        relabelled = _nearest(x, x_sq, centres)
        done = bool(torch.equal(relabelled, labels) or shift <= threshold)
        labels = relabelled
        if done:
            break
    return torch.empty_like(labels).index_copy_(0, order, labels)


# -- EM, batched over components ---------------------------------------------------------


def _estimate(x: Tensor, resp: Tensor, reg_covar: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(nk [K], means [K, d], covariances [K, d, d]) of responsibilities resp [N, K], as scikit-learn's M step."""
    n, d = x.shape
    k = resp.shape[1]
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp.T @ x) / nk[:, None]
    cov = torch.zeros(k, d, d, dtype=x.dtype, device=x.device)
    step = _rows_per_block(k, d, x.dtype)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        # sqrt(r) (x - mu) laid out [K, d, B]: one temporary, its Gram matrices the weighted scatter
        # (measured on the CPU: the fastest layout for bmm, 1.3x the [K, B, d] one).
        diff = x[rows].T[None] - means[:, :, None]
        diff *= resp[rows].T.sqrt()[:, None, :]
        cov.baddbmm_(diff, diff.transpose(1, 2))
    cov /= nk[:, None, None]
    cov.diagonal(dim1=1, dim2=2).add_(reg_covar)
    return nk, means, cov


def _precision_chol(cov: Tensor) -> Tuple[Tensor, Tensor]:
    """(upper-triangular P [K, d, d] with P P^T = cov^-1, the Cholesky info [K]; nonzero: failed)."""
    lower, info = torch.linalg.cholesky_ex(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    return torch.linalg.solve_triangular(lower, eye, upper=False).transpose(1, 2), info


def _precision_chol_from_precisions(precisions: Tensor) -> Tuple[Tensor, Tensor]:
    """The upper-triangular P [K, d, d] with P P^T = precisions [K, d, d], and the Cholesky info [K]."""
    flipped = precisions.flip(-1, -2)
    lower, info = torch.linalg.cholesky_ex(flipped)
    return lower.flip(-1, -2), info


def _e_step(x: Tensor, mix: _Mixture) -> Tuple[Tensor, Tensor]:
    """(mean log-likelihood [], log responsibilities [N, K]), in row blocks of [K, B, d]."""
    n, d = x.shape
    k = mix.means.shape[0]
    log_det = mix.precision_chol.diagonal(dim1=1, dim2=2).log().sum(1)  # [K]: log det P
    shifted_means = (mix.means[:, None, :] @ mix.precision_chol).reshape(1, k, d)  # mu P
    # All K factors side by side [d, K d]: x P_k for every k is one wide product (measured on the
    # CPU: 3x faster than the batched product that broadcasts x over K).
    wide = mix.precision_chol.transpose(0, 1).reshape(d, k * d)
    offset = log_det + mix.weights.log() - 0.5 * d * math.log(2 * math.pi)
    log_resp = torch.empty(n, k, dtype=x.dtype, device=x.device)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    step = _rows_per_block(k, d, x.dtype)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        y = (x[rows] @ wide).view(-1, k, d)  # [B, K, d], then (x - mu) P in place
        y -= shifted_means
        weighted = offset - 0.5 * y.square_().sum(-1)  # [B, K]
        norm = torch.logsumexp(weighted, 1)
        log_resp[rows] = weighted - norm[:, None]
        total += norm.sum()
    return total / n, log_resp


def _from_responsibilities(x: Tensor, resp: Tensor, reg_covar: float) -> _Mixture:
    """scikit-learn's initialisation from responsibilities: weights nk / N (not renormalised)."""
    nk, means, cov = _estimate(x, resp, reg_covar)
    chol, info = _precision_chol(cov)
    if bool((info != 0).any()):
        raise ValueError(_CHOLESKY_FAILED)
    return _Mixture(nk / x.shape[0], means, chol)


def _em(x: Tensor, mix: _Mixture, reg_covar: float, tol: float, max_iter: int) -> Tuple[_Mixture, float, bool]:
    """EM from ``mix`` as scikit-learn runs it: (the last M step's mixture, its lower bound, converged)."""
    lower_bound = -math.inf
    for _ in range(max_iter):
        previous = lower_bound
        mean_loglik, log_resp = _e_step(x, mix)
        nk, means, cov = _estimate(x, log_resp.exp_(), reg_covar)
        chol, info = _precision_chol(cov)
        mix = _Mixture(nk / nk.sum(), means, chol)
        # One host read per iteration: the stopping rule and the factorisations' success.
        lower_bound, failed = torch.stack([mean_loglik, (info != 0).any().to(x.dtype)]).tolist()
        if failed:
            raise ValueError(_CHOLESKY_FAILED)
        if abs(lower_bound - previous) < tol:
            return mix, lower_bound, True
    return mix, lower_bound, False


def _given_init(init: Any, x: Tensor, k: int, reg_covar: float) -> _Mixture:
    """The initial mixture from ``init``: labels [N], responsibilities [N, K], or a mapping of parameters."""
    n, d = x.shape
    kw: Dict[str, Any] = dict(dtype=x.dtype, device=x.device)
    if isinstance(init, Mapping):
        unknown = set(init) - {"weights", "means", "covariances", "precisions"}
        if unknown or "weights" not in init or "means" not in init or ("covariances" in init) == ("precisions" in init):
            raise ValueError(
                "init as a mapping takes 'weights' [K], 'means' [K, d] and one of 'covariances' or 'precisions' "
                f"[K, d, d] (in pca_reduce's coordinates), got keys {sorted(init)}"
            )
        weights = as_tensor(init["weights"], "init['weights']").to(**kw)
        means = as_tensor(init["means"], "init['means']").to(**kw)
        key = "covariances" if "covariances" in init else "precisions"
        square = as_tensor(init[key], f"init[{key!r}]").to(**kw)
        for name, value, shape in (("weights", weights, (k,)), ("means", means, (k, d)), (key, square, (k, d, d))):
            if tuple(value.shape) != shape:
                raise ValueError(f"init[{name!r}] must have shape {shape} (K={k} components, d={d} PCA "
                                 f"coordinates), got {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"init[{name!r}] contains NaN or Inf")
        if bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError(f"init['weights'] must be non-negative and sum to 1, got sum {float(weights.sum()):.6g}")
        chol, info = (_precision_chol if key == "covariances" else _precision_chol_from_precisions)(square)
        if bool((info != 0).any()):
            raise ValueError(f"init[{key!r}] must be symmetric positive definite")
        return _Mixture(weights, means, chol)
    given = as_tensor(init, "init").to(x.device)
    if given.dim() == 1 and not given.is_floating_point():
        if given.shape[0] != n:
            raise ValueError(f"init labels must have N={n} entries (one component per sample), got {given.shape[0]}")
        if bool(((given < 0) | (given >= k)).any()):
            raise ValueError(f"init labels must be component ids in 0..{k - 1}")
        resp = torch.zeros(n, k, **kw)
        resp[torch.arange(n, device=x.device), given.to(torch.int64)] = 1
        return _from_responsibilities(x, resp, reg_covar)
    if given.dim() == 2:
        if tuple(given.shape) != (n, k):
            raise ValueError(f"init responsibilities must have shape ({n}, {k}) (N samples, K components), "
                             f"got {tuple(given.shape)}")
        resp = given.to(**kw)
        if not bool(torch.isfinite(resp).all()) or bool((resp < 0).any()):
            raise ValueError("init responsibilities must be finite and non-negative")
        return _from_responsibilities(x, resp, reg_covar)
    raise ValueError(
        f"init must be integer labels [N], responsibilities [N, K] or a mapping; got shape {tuple(given.shape)} "
        f"and dtype {given.dtype}"
    )


def nleep(
    features: Any,
    labels: Any,
    *,
    components_per_class: int = 5,
    variance: float = 0.8,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
    n_init: int = 1,
    seed: int = 0,
    init: Any = None,
    legacy_leep: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """NLEEP (Li et al., CVPR 2021): LEEP of a Gaussian mixture's posteriors on PCA-reduced features.

    The features are reduced by PCA to the fewest components keeping more
    than ``variance`` of the variance (``pca_reduce``); a Gaussian mixture of
    K = ``components_per_class`` x C components (C classes present) with
    full covariances is fitted to them by EM, as scikit-learn's
    ``GaussianMixture`` with the published settings; the score is LEEP of
    its posteriors p(z | x) [N, K] against the labels.

    Initialisation (``init``):

    * None: seeded k-means (``kmeans_labels``: greedy k-means++ then Lloyd)
      from ``numpy.random.default_rng(seed)``, the clusters as one-hot
      responsibilities, as scikit-learn's ``init_params="kmeans"`` does with
      its own KMeans. The published code leaves scikit-learn unseeded, so
      its score varies from run to run; this one is reproducible, but its
      random numbers are not scikit-learn's, so it lands on another of the
      local optima the published code lands on across runs. ``n_init``
      restarts draw from the same generator and keep the best fit.
    * integer labels [N] in 0..K-1 (scikit-learn's KMeans labels, say) or
      responsibilities [N, K]: the mixture is initialised from them as
      scikit-learn does.
    * a mapping ``{"weights": [K], "means": [K, d], "covariances" or
      "precisions": [K, d, d]}`` in ``pca_reduce``'s coordinates (those of
      scikit-learn's PCA): scikit-learn's ``weights_init``, ``means_init``,
      ``precisions_init``.

    Given the same initialisation the result matches scikit-learn (and the
    published code) to round-off.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        components_per_class: mixture components per class present (5, as
            published; its evaluation script uses 1 for two data sets).
        variance: the share of the variance PCA keeps, in (0, 1) (0.8).
        reg_covar: added to each covariance's diagonal (1e-6). Absolute, so
            the score depends on the features' scale, as published.
        tol: EM stops when the mean log-likelihood changes by less (1e-3).
        max_iter: at most this many EM iterations (100); a RuntimeWarning
            when it is reached without converging.
        n_init: seeded initialisations to fit, the best kept (1); only with
            ``init=None``.
        seed: the seed of the default initialisation (0).
        init: see above.
        legacy_leep: True reproduces the published code's last step, the mean
            of the expected empirical prediction without the log; False (the
            default) is LEEP as Nguyen et al. and Li et al. define it, the
            mean of its log.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor: LEEP <= 0 (``legacy_leep``: a mean probability in
        (0, 1]). Larger is better. Invariant to shifting the features and
        (the seeded k-means takes the rows in a canonical order) to the order
        of the samples.
    """
    options = compute_options(dtype=dtype, device=device)
    dtype = options.dtype
    per_class = _count(components_per_class, "components_per_class")
    variance = _fraction(variance, "variance")
    reg_covar = positive_float(reg_covar, "reg_covar")
    tol = positive_float(tol, "tol")
    max_iter = _count(max_iter, "max_iter")
    n_init = _count(n_init, "n_init")
    seed = _seed(seed)
    if not isinstance(legacy_leep, bool):
        raise TypeError(f"legacy_leep must be a bool, got {type(legacy_leep).__name__}")
    if init is not None and not isinstance(init, (Tensor, np.ndarray, Mapping)):
        raise TypeError(f"init must be None, a tensor or array, or a mapping of parameters, got {type(init).__name__}")
    if init is not None and n_init != 1:
        raise ValueError("n_init > 1 restarts the seeded initialisation; with a given init use n_init=1")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=options.device)
    y, c, n = inputs.targets, inputs.num_columns, inputs.num_samples
    with torch.no_grad():
        present = int(torch.unique(y).numel())  # not class_counts: a stray huge id must not allocate C first
        k = per_class * present
        check_class_count(c, n, c * k, f"NLEEP's joint of classes and {k} components (C x K)")
        if n < k:
            raise ValueError(
                f"NLEEP fits K = components_per_class x classes = {per_class} x {present} = {k} mixture components, "
                f"which needs at least {k} samples; got N = {n} (lower components_per_class)"
            )
        x = _pca(inputs.features, variance, dtype, inputs.magnitude)
        best: Optional[_Mixture] = None
        if init is not None:
            best, _, converged = _em(x, _given_init(init, x, k, reg_covar), reg_covar, tol, max_iter)
        else:
            rng = np.random.default_rng(seed)
            best_bound, converged = -math.inf, False
            for _ in range(n_init):
                labels_k = kmeans_labels(x, k, rng)
                start = torch.zeros(n, k, dtype=dtype, device=x.device)
                start[torch.arange(n, device=x.device), labels_k] = 1
                fit, bound, done = _em(x, _from_responsibilities(x, start, reg_covar), reg_covar, tol, max_iter)
                if best is None or bound > best_bound:
                    best, best_bound, converged = fit, bound, done
        assert best is not None
        if not converged:
            warnings.warn(
                f"NLEEP: the Gaussian mixture did not converge in max_iter={max_iter} EM iterations (tol={tol}); "
                "the score uses its last parameters, as scikit-learn does. Raise max_iter or tol.",
                RuntimeWarning,
                stacklevel=2,
            )
        posteriors = _e_step(x, best)[1].exp_()
        return leep_from_probs(posteriors, y, c, dtype, log=not legacy_leep)
