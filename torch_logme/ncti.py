"""NCTI (Wang et al., ICCV 2023): how far a model's features are from neural collapse on the target data.

The features are reduced by PCA, then a linear discriminant (LDA) is fitted
to them; three terms follow from it:

    seli  the nuclear norm of the centred LDA projection [N, min(C-1, k)]
          (simplex encoded label interpolation)
    ncc   the average LDA probability of each sample's own class
          (nearest-centre classifier)
    vc    log of the sum over classes of the nuclear norms of the class's
          LDA probabilities [n_c, C] (within-class variability collapse)

The published code min-max normalises each term across the pool of
candidate models and scores a model by ncc + seli - vc: ``ncti`` returns one
model's terms, ``ncti_combine`` the published combination of a pool's.

Memory: the PCA scores [N, k] (k <= 64 by default) besides the features,
the D x D Gram matrix (N > D) or an SVD of the centred features (N <= D),
and one block of classes' probabilities at a time.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ._checks import prepare
from ._primitives import (
    add_gram_,
    class_blocks,
    class_sums,
    gram_eigh,
    itemsize,
    present_classes,
    row_chunks,
    safe_divide,
)
from ._validators import boolean, positive_int
from .scores import BLOCK_BYTES, Device, Frame, _check_classes, _finite, _resolvable, _resolve, framed, make_frame

__all__ = ["ncti", "ncti_combine", "TERMS", "N_COMPONENTS", "VARIANCE_COMPONENTS"]

#: The per-model terms ``ncti`` returns, in this order.
TERMS = ("seli", "ncc", "vc")
#: PCA components kept, as published.
N_COMPONENTS = 64
#: The LDA's shrinkage is exp(-(sum of the first VARIANCE_COMPONENTS PCA variances)) ...
VARIANCE_COMPONENTS = 32
#: ... unless that is at most MIN_SHRINKAGE, when the unshrunk (SVD) solver runs, as published.
MIN_SHRINKAGE = 1e-10
#: scikit-learn's LDA tolerance: whitened within-class singular values at or below it, and
#: between-class ones at or below it times the largest, are dropped.
LDA_TOL = 1e-4
#: Singular values of the PCA scores at or below ROUNDOFF * max(N, D) * eps * the largest (numpy's
#: matrix_rank rule) are round-off of an exact 0 (rank-deficient features; the N-th when N <= D):
#: those components are 0.
ROUNDOFF = 1
#: Eigenvalues of the D x D Gram matrix below TRUST * D * eps * the largest carry too few digits to
#: rank their directions; when the k kept components reach down to them, those directions are
#: ranked again from an SVD of the features projected on them.
TRUST = 1024
#: Rows of a class taken at a time when a class has more rows than classes (QR-reduced in between).
MIN_ROWS = 256


# -- PCA -------------------------------------------------------------------------------


def _stacked_r(chunks: Iterator[Tensor]) -> Tensor:
    """The R factor [r, r] of the rows [*, r] the chunks yield, stacked: its SVD is theirs, to working precision."""
    r: Optional[Tensor] = None
    for block in chunks:
        r = torch.linalg.qr(block if r is None else torch.cat([r, block]), mode="r")[1]
    assert r is not None  # N >= 1 rows
    return r


def principal_scores(f: Tensor, dtype: torch.dtype, frame: Frame, k: int) -> Tuple[Tensor, Tensor]:
    """(scores z [N, k], squared singular values [k], descending) of the leading k principal components.

    Of the centred features X in ``frame``: z = X V_k, the columns of V_k the
    leading right singular vectors of X (signs are arbitrary; every term is
    invariant to them). N <= D: an SVD of X. N > D: the eigenvectors of the
    D x D Gram matrix, summed in row chunks; if the k components reach
    eigenvalues whose digits are round-off (TRUST), the directions from
    there on are ranked by an SVD of X projected on them (its R factor,
    chunk by chunk), as an SVD of X would rank them. Last, an SVD of z
    [N, k] gives each component's variance from the data themselves and
    sets the round-off components (ROUNDOFF) to exactly 0.
    """
    n, d = f.shape
    eps = torch.finfo(dtype).eps
    convert = partial(framed, dtype=dtype, shift=frame.shift, scale=frame.scale, centre=frame.centre)
    if n <= d:
        u, sing, _ = torch.linalg.svd(convert(f), full_matrices=False)
        z = u[:, :k] * sing[:k]
    else:
        gram = torch.zeros(d, d, dtype=dtype, device=f.device)
        for _, x in row_chunks(f, dtype, convert):
            add_gram_(gram, x)
        lam, vec = gram_eigh(gram)
        lam, vec = lam.flip(0), vec.flip(1)
        trusted = int((lam > TRUST * d * eps * lam[0]).sum())
        if trusted >= k:
            basis = vec[:, :k]
        else:
            rest = vec[:, trusted:]
            _, _, wh = torch.linalg.svd(_stacked_r(x @ rest for _, x in row_chunks(f, dtype, convert)))
            basis = torch.cat([vec[:, :trusted], rest @ wh[: k - trusted].T], 1)
        z = torch.empty(n, k, dtype=dtype, device=f.device)
        for rows, x in row_chunks(f, dtype, convert):
            z[rows] = x @ basis
    u, sing, _ = torch.linalg.svd(z, full_matrices=False)
    sing = torch.where(sing > ROUNDOFF * max(n, d) * eps * sing[0], sing, torch.zeros_like(sing))
    return u * sing, sing * sing


# -- LDA -------------------------------------------------------------------------------


def _shrunk(s: Tensor, shrinkage: float) -> Tensor:
    """(1 - shrinkage) s + shrinkage (tr s / k) I for s [k, k]."""
    out = s * (1.0 - shrinkage)
    out.diagonal().add_(shrinkage * s.trace() / s.shape[0])
    return out


def lda_svd(
    within: Tensor, means: Tensor, priors: Tensor, n: int, unbiased: bool
) -> Tuple[Tensor, Tensor]:
    """(scalings [k, r], projection [k, m]) of scikit-learn's SVD-solver LDA, from its covariances.

    Whitening: W1 = D^-1 V S^-1 with D the within-class standard deviations
    (1 where 0) and V S^2 V^T the eigendecomposition of D^-1 S_w D^-1
    (times N / (N - K) when ``unbiased``), directions with S <= LDA_TOL
    dropped. Between: the right singular vectors of the whitened class
    offsets sqrt(n_c) (mu_c - mean) W1, those with singular value <=
    LDA_TOL times the largest dropped; scalings = W1 times them. The
    projection is their first min(K - 1, k).
    """
    k = within.shape[0]
    std = within.diagonal().sqrt()
    std = torch.where(std == 0, torch.ones_like(std), std)
    corr = within / std[:, None] / std[None, :]
    if unbiased:
        corr = corr * (n / (n - means.shape[0]))
    lam, vec = torch.linalg.eigh(corr)
    root = lam.clamp_min(0).sqrt()
    keep = root > LDA_TOL
    whiten = vec[:, keep] / std[:, None] / root[keep]
    centre = priors @ means
    offsets = (n * priors).sqrt()[:, None] * ((means - centre) @ whiten)
    _, sing, vt = torch.linalg.svd(offsets, full_matrices=False)
    rank = int((sing > LDA_TOL * sing[0]).sum()) if sing.numel() else 0
    scalings = whiten @ vt[:rank].T
    return scalings, scalings[:, : min(means.shape[0] - 1, k)]


def lda_eigen(within: Tensor, total: Tensor, shrinkage: float, m: int) -> Tuple[Tensor, Tensor]:
    """(Cholesky factor of the shrunk S_w, projection [k, m]) of scikit-learn's eigen-solver LDA.

    S_w and S_t shrunk by ``shrinkage`` towards (trace / k) I, S_b = S_t - S_w;
    the projection is the m leading solutions of S_b v = lam S_w v with
    v^T S_w v = 1 (a Cholesky factor L of S_w and the eigenvectors of
    L^-1 S_b L^-T).
    """
    sw = _shrunk(within, shrinkage)
    factor, info = torch.linalg.cholesky_ex(sw)
    if int(info) != 0:
        raise ValueError("NCTI: the shrunk within-class covariance is singular (features constant within classes)")
    between = _shrunk(total, shrinkage) - sw
    half = torch.linalg.solve_triangular(factor, between, upper=False)
    a = torch.linalg.solve_triangular(factor, half.T, upper=False)
    _, u = torch.linalg.eigh(0.5 * (a + a.T))
    top = u.flip(1)[:, :m]
    return factor, torch.linalg.solve_triangular(factor.T, top, upper=True)


# -- the class-wise nuclear norms --------------------------------------------------------


def class_nuclear_norms(
    rows_of: Callable[[Tensor], Tensor],
    labels: Tensor,
    counts_host: List[int],
    width: int,
    dtype: torch.dtype,
    budget: int = BLOCK_BYTES,
) -> Tensor:
    """[K]: the nuclear norm of each class's rows P_c = rows_of(indices of class c's samples) [n_c, width].

    Classes are taken a block at a time, in order of size so that a block
    pads to a similar size; their rows are gathered into a zero-padded
    [B, R, width] tensor (zero rows change no singular value). A class with
    more than max(width, MIN_ROWS) rows is read that many rows at a time,
    each window stacked under the R factor of the rows before it and
    QR-reduced to [width, width], which keeps the singular values exactly.
    The singular values come from an SVD, not from a Gram matrix, so the
    small ones keep their digits. Blocks bound memory by ``budget`` bytes;
    the loop is over blocks of data, not over classes.
    """
    device = labels.device
    item = itemsize(dtype)
    window = max(width, MIN_ROWS)
    out = torch.zeros(len(counts_host), dtype=dtype, device=device)

    def cost(num: int, largest: int) -> int:  # the padded rows, the stack under an R factor, LAPACK's copy
        rows = min(largest, window)
        return 3 * num * (rows + (width if largest > window else 0)) * width * item

    for block in class_blocks(labels, counts_host, cost, budget):
        num, largest = len(block.ids), block.largest
        step = min(largest, window)
        reduced = None
        for valid, rows in block.windows(step):
            padded = torch.zeros(num, step, width, dtype=dtype, device=device)
            padded[valid] = rows_of(rows)
            if largest <= step:
                reduced = padded
            else:
                stack = padded if reduced is None else torch.cat([reduced, padded], 1)
                reduced = torch.linalg.qr(stack, mode="r")[1]
        assert reduced is not None  # largest >= 1: the loop ran
        ids = torch.tensor(block.ids, dtype=torch.int64, device=device)
        out[ids] = torch.linalg.svdvals(reduced).sum(-1)
    return out


# -- the score ---------------------------------------------------------------------------


def ncti(
    features: Any,
    labels: Any,
    *,
    n_components: int = N_COMPONENTS,
    variance_components: int = VARIANCE_COMPONENTS,
    unbiased_within: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """NCTI's per-model terms (Wang et al., ICCV 2023): [seli, ncc, vc].

    1. PCA of the features to k = min(n_components, N, D) components (exact,
       from an eigendecomposition; the published code calls scikit-learn's
       PCA, whose default solver is randomised for large inputs).
    2. LDA on the k scores, with scikit-learn's semantics: priors n_c / N;
       with t = exp(-(sum of the first ``variance_components`` PCA variances,
       normalised by N - 1)), the eigen solver with shrinkage t when t >
       1e-10, else the SVD solver without shrinkage.
    3. seli = ||centred LDA projection||_* (min(C - 1, k) directions);
       ncc = (1/N) sum_i p(y_i | x_i); vc = log sum_c ||P_c||_*, P_c the
       [n_c, C] LDA probabilities of class c's samples.

    Rank a pool of models with ``ncti_combine`` (the published min-max
    normalisation across models); one model's terms mean little alone.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids (only the classes that occur count).
        n_components: PCA components kept (default 64, as published; the
            published code fails when min(N, D) < 64, here k is capped).
        variance_components: leading PCA variances summed for the shrinkage
            (default 32, as published).
        unbiased_within: the SVD solver's within-class covariance normalised
            by N - C, as scikit-learn < 1.9 did (and so the published
            results). Default False: by N, as scikit-learn >= 1.9 and the
            eigen solver do, so that the two solvers agree where they meet.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        1-D tensor [3]: (seli, ncc, vc), in ``TERMS`` order. Raises
        ValueError for fewer than two classes or N <= C.
    """
    dtype, device = _resolve(dtype, device)
    positive_int(n_components, "n_components")
    positive_int(variance_components, "variance_components")
    unbiased_within = boolean(unbiased_within, "unbiased_within")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * c, "NCTI's class probabilities (C x C)")
    f, n, d = inputs.features, inputs.num_samples, inputs.num_features
    with torch.no_grad():
        y, counts = present_classes(inputs.targets, inputs.num_columns, dtype)
        c = counts.shape[0]
        if c < 2:
            raise ValueError(f"NCTI needs at least two classes in labels, got {c}")
        if n <= c:
            raise ValueError(f"NCTI's LDA needs more samples than classes, got N={n} for {c} classes")
        # PCA centres the rows themselves: centre to the last digit of any offset.
        frame = make_frame(f, dtype, per_column=False, power=2, centre=True, largest=inputs.magnitude)
        _resolvable(frame, dtype, 2, "NCTI")
        k = min(n_components, n, d)
        z, lam = principal_scores(f, dtype, frame, k)
        # The shrinkage reads the PCA variances in the features' own units.
        variance = float(lam[:variance_components].sum()) / (n - 1)
        try:
            variance = math.ldexp(variance, -2 * int(frame.log2_scale[0]))
        except OverflowError:
            variance = math.inf
        shrinkage = max(math.exp(-variance), MIN_SHRINKAGE)

        priors = counts / n
        means = class_sums(z, y, c) / counts[:, None]
        centre = priors @ means
        zc = z - centre
        within = (z - means[y]).T @ (z - means[y]) / n
        m = min(c - 1, k)
        if shrinkage == MIN_SHRINKAGE:
            scalings, projection = lda_svd(within, means, priors, n, unbiased_within)
            offsets = (means - centre) @ scalings  # [C, r]
            weights = scalings @ offsets.T
            bias = -0.5 * (offsets * offsets).sum(1) + priors.log()
        else:
            factor, projection = lda_eigen(within, zc.T @ zc / n, shrinkage, m)
            weights = torch.cholesky_solve((means - centre).T.contiguous(), factor)
            bias = -0.5 * ((means - centre) * weights.T).sum(1) + priors.log()
        seli = torch.linalg.svdvals(zc @ projection).sum()

        def probs(rows: Tensor) -> Tensor:
            return torch.softmax(zc[rows] @ weights + bias, 1)

        own = torch.zeros((), dtype=dtype, device=f.device)
        for rows, chunk in row_chunks(zc, dtype):
            own += torch.softmax(chunk @ weights + bias, 1).gather(1, y[rows, None]).sum()
        norms = class_nuclear_norms(probs, y, [int(v) for v in counts.tolist()], c, dtype)
        terms = torch.stack([seli, own / n, norms.sum().log()])
        for name, value in zip(TERMS, terms):
            _finite(value, f"NCTI's {name} term", frame.size)
        return terms


def ncti_combine(terms: Tensor) -> Tensor:
    """NCTI scores [M] of M models from their terms [M, 3] (``TERMS`` order): the published combination.

    Each term is min-max normalised across the M models, (t - min) / (max -
    min), and a model scores ncc + seli - vc. Larger is better. A term on
    which every model ties (and so a pool of one) contributes 0, where the
    published code divides 0 by 0.
    """
    if not isinstance(terms, Tensor):
        raise TypeError(f"terms must be a tensor [M, {len(TERMS)}], got {type(terms).__name__}")
    if terms.dim() != 2 or terms.shape[1] != len(TERMS):
        raise ValueError(f"terms must be a tensor [M, {len(TERMS)}] of ({', '.join(TERMS)}) per model")
    low = terms.amin(0)
    span = terms.amax(0) - low
    scaled = safe_divide(terms - low, span, span > 0)
    return scaled[:, 1] + scaled[:, 0] - scaled[:, 2]
