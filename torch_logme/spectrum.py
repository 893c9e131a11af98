"""One eigendecomposition per data set: eigenvalues and projected targets.

The fixed point needs only the eigenvalues lam of F^T F and, per column y,
the squared projections z^2 with z = V^T F^T y (DESIGN §2-§3). Three ways to
get them:

* primal: eigh of the D x D Gram matrix (from the sufficient statistics);
* dual:   eigh of the N x N matrix F F^T, for N <= D (cost N^3, not D^3);
  then z_i^2 = lam_i (u_i^T y)^2, with no division by lam;
* svd:    thin SVD of F itself, for badly conditioned features in low precision.

Each also returns what the posterior means need: m_c = basis^T (coef_c / (t_c + lam)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .statistics import SufficientStatistics, add_gram_, add_rows_, column_chunks


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

    def posterior_means(self, t: Tensor) -> Tensor:
        """Posterior means [C, D] for per-column ratios t = alpha / beta [C]."""
        if self.basis is None:
            raise RuntimeError("this spectrum was computed without the basis for posterior means")
        weights = self.coef / (t.unsqueeze(1) + self.eigenvalues)
        return weights @ self.basis


def primal(stats: SufficientStatistics, *, with_basis: bool = True) -> Spectrum:
    """Spectrum from the Gram matrix: eigh of G [D, D], then Z = cross V."""
    lam, vecs = torch.linalg.eigh(stats.gram, UPLO="U")  # add_gram_ fills the upper triangle
    z = stats.cross @ vecs
    return Spectrum(
        eigenvalues=lam.clamp_min_(0),
        proj_sq=z * z,
        target_sq=stats.target_sq,
        coef=z,
        basis=vecs.T if with_basis else None,
        num_samples=stats.num_samples,
        num_features=stats.gram.shape[0],
    )


def _column_sums(u: Tensor, targets: Tensor, num_columns: int, classification: bool) -> Tensor:
    """Y^T U [C, k] for U [N, k]: per-class row sums for labels, a matmul otherwise."""
    if classification:
        out = torch.zeros(num_columns, u.shape[1], dtype=u.dtype, device=u.device)
        return add_rows_(out, targets, u)
    return targets.to(u.dtype).T @ u


def _target_sq(targets: Tensor, num_columns: int, classification: bool, dtype: torch.dtype) -> Tensor:
    if classification:
        out = torch.zeros(num_columns, dtype=dtype, device=targets.device)
        return out.index_add_(0, targets, torch.ones_like(targets, dtype=dtype))
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
    lam, u = torch.linalg.eigh(kernel, UPLO="U")
    lam = lam.clamp_min_(0)
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
    lam = s * s
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
    )

