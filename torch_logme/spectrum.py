"""One eigendecomposition per data set: eigenvalues and projected targets.

The fixed point needs only the eigenvalues lam of F^T F and, per column y,
the squared projections z^2 with z = V^T F^T y (docs/design.md). Four ways
to get them:

* primal: eigh of the D x D Gram matrix (from the sufficient statistics);
* precise: the same eigenvalues to the accuracy of an SVD of F, from the
  same statistics: eigh of the centred, scaled second moment, then an SVD
  of the (D + 1) x D factor [its square root; sqrt(N) mean]. It costs about
  three eigh's; ``functional.solve`` takes it when the primal cannot
  resolve the spectrum (offset, graded or ill-conditioned features);
* dual:   eigh of the N x N matrix F F^T, for N <= D (cost N^3, not D^3);
  then z_i^2 = lam_i (u_i^T y)^2, with no division by lam;
* svd:    thin SVD of F itself, for badly conditioned features in low precision.

An eigendecomposition of a matrix A gets every eigenvalue to within about
eps * ||A|| (``Spectrum.noise``). Eigenvalues at or below that are not
resolved: they count as 0 and their projections z as 0, so the mass of y
along them is counted as residual and never divided by a round-off value.

Each also returns what the posterior means need: m_c = basis^T (coef_c / (t_c + lam)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._primitives import add_gram_, class_counts, class_sums, column_chunks, gram_eigh
from .sums import CONSTANT_COLUMN_EPS, SufficientStatistics


@dataclass
class Spectrum:
    """What the fixed point consumes, for k eigen-directions and C columns.

    eigenvalues: [k], >= 0 (round-off negatives clamped to 0).
    proj_sq: [C, k] z^2 per column and eigen-direction.
    target_sq: [C] y^T y per column.
    whitened_sq: [C, k] (u_i^T y)^2 with u_i the unit left singular vectors
        (so proj_sq = eigenvalues * whitened_sq), or None for the primal.
    outside_sq: [C] the part of y^T y outside span(u_i), or None for the
        primal. With both, the residual ||y - F m||^2 is a sum of positive
        terms (no cancellation), which keeps N <= D accurate in float32.
    coef: [C, k] signed coefficients for the posterior means.
    basis: [k, D] directions for the posterior means, or None when not asked for.
    num_samples, num_features: N and D (k <= D; the D - k missing eigenvalues are 0).
    noise: [k] the round-off uncertainty of each eigenvalue: eps * largest
        from an eigendecomposition of F^T F, 2 eps * sigma_max * sigma_i from
        an SVD (sigma the singular values). Eigenvalues within a factor of
        the matrix order of it (unresolved) were set to 0.
    dropped_sq: [C, k] the z^2 that were set to 0 with unresolved directions
        (0 elsewhere), or None when no z was dropped (whitened forms keep p^2).
    """

    eigenvalues: Tensor
    proj_sq: Tensor
    target_sq: Tensor
    coef: Tensor
    basis: Optional[Tensor]
    num_samples: int
    num_features: int
    whitened_sq: Optional[Tensor] = None
    outside_sq: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    dropped_sq: Optional[Tensor] = None

    def posterior_means(self, t: Tensor) -> Tensor:
        """Posterior means [C, D] for per-column ratios t = alpha / beta [C]."""
        if self.basis is None:
            raise RuntimeError("this spectrum was computed without the basis for posterior means")
        weights = self.coef / (t.unsqueeze(1) + self.eigenvalues)
        return weights @ self.basis


def _resolved(raw: Tensor, noise: Tensor, dims: int) -> Tensor:
    """The eigenvalues with the unresolved ones (at most ``dims`` times their noise) set to 0.

    A backward-stable eigh or SVD is good to a small multiple of its noise;
    the order of the matrix is a safe bound on that multiple for LAPACK's
    and cuSOLVER's solvers.
    """
    return torch.where(raw > dims * noise, raw, torch.zeros_like(raw))


def _eigh_noise(raw: Tensor) -> Tensor:
    """[k] the noise of eigenvalues [k] from an eigh: eps * the largest magnitude, for each."""
    return (torch.finfo(raw.dtype).eps * raw.abs().amax()).expand_as(raw)


def _svd_noise(sigma: Tensor) -> Tensor:
    """[k] the noise of squared singular values sigma^2 from an SVD: 2 eps sigma_max sigma_i."""
    return 2 * torch.finfo(sigma.dtype).eps * sigma.amax() * sigma


def primal(stats: SufficientStatistics, *, with_basis: bool = True) -> Spectrum:
    """Spectrum from the Gram matrix: eigh of G [D, D], then Z = F^T Y V."""
    # Unshifted sums are F^T F as stored: gram_eigh reads them without a symmetric copy.
    gram = stats.gram if stats.shift is None else stats.raw_gram()
    raw, vecs = gram_eigh(gram)
    noise = _eigh_noise(raw)
    lam = _resolved(raw, noise, raw.shape[0])
    # z of an unresolved direction is round-off (or signal the eigh lost): its mass goes to the residual.
    return _projected(stats, lam, vecs, noise, with_basis)


def _projected(
    stats: SufficientStatistics, lam: Tensor, vecs: Tensor, noise: Tensor, with_basis: bool
) -> Spectrum:
    """The primal Spectrum for eigenvalues [k] and eigenvectors [D, k] of F^T F."""
    z = stats.raw_cross() @ vecs
    # z of an unresolved direction is round-off, or signal the decomposition lost:
    # its mass goes to the residual, and the round-off estimate reads it.
    resolved = lam > 0
    z_sq = z * z
    return Spectrum(
        eigenvalues=lam,
        proj_sq=z_sq * resolved,
        target_sq=stats.target_sq,
        coef=z * resolved,
        basis=vecs.T if with_basis else None,
        num_samples=stats.num_samples,
        num_features=stats.gram.shape[0],
        noise=noise,
        dropped_sq=z_sq * ~resolved,
    )


def precise(stats: SufficientStatistics, *, with_basis: bool = True) -> Spectrum:
    """Spectrum from the same statistics, to the accuracy of an SVD of F.

    F^T F = S + N mu mu^T with S the centred second moment. Neither the
    offset mu nor columns of very different scales then reach the
    decomposition of S: it is made of the correlation matrix
    C = S / (d d^T), d^2 = diag(S), which is O(1) whatever the features'
    scale. Its square root L = sqrt(Lam_C) W^T diag(d) and sqrt(N) mu^T,
    stacked into B [D + 1, D] with B^T B = F^T F, are decomposed by an SVD,
    whose singular values sigma are good to about eps * sigma_max: lam =
    sigma^2 to eps * sqrt(lam_max lam), not eps * lam_max as from eigh(F^T F).
    """
    centred, mu = stats.centred()
    variance = centred.diagonal()
    # A constant column's centred moments are round-off of its second moment about
    # the shift; by Cauchy-Schwarz its row and column are 0: make them so.
    constant = variance <= CONSTANT_COLUMN_EPS * torch.finfo(variance.dtype).eps * stats.gram.diagonal()
    centred = centred * ~constant[:, None] * ~constant[None, :]
    scale = torch.where(constant, torch.ones_like(variance), variance.clamp_min(0).sqrt())
    corr = (centred / scale[:, None] / scale[None, :]).clamp_(-1, 1)
    corr_raw, corr_vecs = torch.linalg.eigh(corr)
    # The correlation's unresolved eigenvalues are round-off (rank-deficient or N <= D
    # features): as square roots they would pass for signal of size sqrt(eps).
    corr_lam = _resolved(corr_raw, _eigh_noise(corr_raw), corr_raw.shape[0])
    root = corr_lam.sqrt()[:, None] * corr_vecs.T * scale[None, :]
    factor = torch.cat([root, (math.sqrt(stats.num_samples) * mu)[None, :]])
    _, sigma, vh = torch.linalg.svd(factor, full_matrices=False)
    raw = sigma * sigma
    noise = _svd_noise(sigma)
    lam = _resolved(raw, noise, factor.shape[1])
    return _projected(stats, lam, vh.T, noise, with_basis)


def _column_sums(u: Tensor, targets: Tensor, num_columns: int, classification: bool) -> Tensor:
    """Y^T U [C, k] for U [N, k]: per-class row sums for labels, a matmul otherwise."""
    if classification:
        return class_sums(u, targets, num_columns)
    return targets.to(u.dtype).T @ u


def _target_sq(targets: Tensor, num_columns: int, classification: bool, dtype: torch.dtype) -> Tensor:
    if classification:
        return class_counts(targets, num_columns, dtype)
    y = targets.to(dtype)
    return (y * y).sum(0)


def dual(
    features: Tensor,
    targets: Tensor,
    num_columns: int,
    classification: bool,
    dtype: torch.dtype,
    *,
    with_basis: bool = True,
) -> Spectrum:
    """Spectrum from the N x N kernel F F^T, for features [N, D] with N <= D."""
    n, d = features.shape
    kernel = torch.zeros(n, n, dtype=dtype, device=features.device)
    for _, chunk in column_chunks(features, dtype):
        add_gram_(kernel, chunk.T)  # F F^T = (F^T)^T F^T
    raw, u = gram_eigh(kernel)
    noise = _eigh_noise(raw)
    lam = _resolved(raw, noise, n)
    p = _column_sums(u, targets, num_columns, classification)
    p_sq = p * p
    target_sq = _target_sq(targets, num_columns, classification, dtype)
    basis = None
    if with_basis:
        # U^T F [N, D], one converted column chunk at a time.
        basis = torch.cat([u.T @ chunk for _, chunk in column_chunks(features, dtype)], dim=1)
    return Spectrum(
        eigenvalues=lam,
        proj_sq=lam * p_sq,
        target_sq=target_sq,
        coef=p,
        basis=basis,
        num_samples=n,
        num_features=d,
        whitened_sq=p_sq,
        # U holds N orthonormal vectors: a complete basis, so nothing of y is outside it.
        outside_sq=torch.zeros_like(target_sq),
        noise=noise,
    )


def svd(
    features: Tensor,
    targets: Tensor,
    num_columns: int,
    classification: bool,
    dtype: torch.dtype,
    *,
    with_basis: bool = True,
) -> Spectrum:
    """Spectrum from the thin SVD of features [N, D] (materialises F in ``dtype``)."""
    f = features if features.dtype == dtype else features.to(dtype)
    n, d = f.shape
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    p = _column_sums(u, targets, num_columns, classification)
    p_sq = p * p
    target_sq = _target_sq(targets, num_columns, classification, dtype)
    raw = s * s
    noise = _svd_noise(s)
    lam = _resolved(raw, noise, max(n, d))
    # Thin U is complete when N <= D; otherwise y keeps a least-squares residual.
    outside = torch.zeros_like(target_sq) if n <= d else (target_sq - p_sq.sum(1)).clamp_min_(0)
    return Spectrum(
        eigenvalues=lam,
        proj_sq=lam * p_sq,
        target_sq=target_sq,
        coef=p * s,
        basis=vh if with_basis else None,
        num_samples=n,
        num_features=d,
        whitened_sq=p_sq,
        outside_sq=outside,
        noise=noise,
    )

