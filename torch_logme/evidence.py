"""The LogME fixed point and evidence, for all columns at once (docs/design.md).

Each column c keeps its own alpha_c, beta_c and stops on its own step: a
column that has met the stopping rule is frozen by a mask while the others
go on. Nothing loops over columns in Python and nothing reads a per-column
value back to the host. On CPU the loop ends as soon as every column has
stopped; elsewhere it runs max_iter masked steps, which gives the same
numbers without a host sync per step.

All formulas are written without dividing by eigenvalues, so they stay
finite for rank-deficient features and in float32.

The same fixed point also exists compiled (csrc/: C++ on the CPU, CUDA on
the GPU; one launch runs every step of every column). ``fixed_point`` is the
one place that chooses between the two; both give the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from . import _extension
from ._options import LogMEOptions

if TYPE_CHECKING:
    from .spectrum import Spectrum

# Added to ||m||^2 and to the residual before dividing, as in the published code.
EPSILON = 1e-5
# The published fixed-point code keeps singular values above this (absolute).
_PUBLISHED_RANK_CUTOFF = 1e-10
# The dtypes the compiled op has kernels for.
_COMPILED_DTYPES = (torch.float32, torch.float64)
# Largest eigenvalues the compiled op gets (its steps are unscaled; see _within_compiled_range).
_COMPILED_RANGE = (2.0**-100, 2.0**100)


@dataclass
class FixedPointResult:
    """Per-column outcome of the fixed point, each [C].

    alpha, beta: the final prior and noise precisions.
    t: alpha / beta of the last step's start, the ratio the published code
        uses for the posterior means.
    evidence: log evidence divided by N (the LogME score of the column).
    steps: number of updates each column took.
    """

    alpha: Tensor
    beta: Tensor
    t: Tensor
    evidence: Tensor
    steps: Tensor


def _logdet_weights(
    lam: Tensor, n: int, d: int, legacy: bool, published_rank: Optional[int] = None
) -> tuple[Optional[Tensor], int]:
    """Which of the k eigenvalues enter log|A|, and how many implicit zeros add log(alpha).

    Correct evidence: all k, plus D - k zero eigenvalues. Published fixed-point
    code: only its rank truncation, the min(N, D) largest eigenvalues and,
    when N > D, only the ``published_rank`` largest: those whose singular
    value exceeds 1e-10 in its SVD of F^T F (see ``published_rank``).
    """
    k = lam.shape[0]
    if not legacy:
        return None, d - k
    kept = min(n, d) if published_rank is None or n <= d else min(published_rank, d)
    keep = torch.zeros(k, dtype=torch.bool, device=lam.device)
    keep[torch.argsort(lam, descending=True)[:kept]] = True
    return keep.to(lam.dtype), 0


def published_rank(gram: "Tensor | np.ndarray") -> int:
    """How many directions the published fixed-point code keeps for F^T F = ``gram`` [D, D] (symmetric), N > D.

    It takes numpy's SVD of F^T F in float64 and keeps the singular values
    whose square root is above 1e-10. Round-off decides that count for
    rank-deficient features (the SVD may report a zero eigenvalue as 0 or
    as round-off of about eps * largest), so this runs the same numpy call,
    on F^T F formed as that code forms it where the features are at hand
    (``legacy_evidence`` only).
    """
    if isinstance(gram, Tensor):
        gram = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    # With the singular vectors, as published: LAPACK then takes another path,
    # whose round-off for a null direction differs from the values-only one.
    _, values, _ = np.linalg.svd(gram)
    return int(np.count_nonzero(np.sqrt(values) > _PUBLISHED_RANK_CUTOFF))


def fixed_point(
    spec: "Spectrum", options: LogMEOptions, published_rank: Optional[int] = None
) -> FixedPointResult:
    """Run the published fixed point on every column of a spectrum at once.

    spec: eigenvalues [k] of F^T F, squared projections z^2 [C, k], y^T y
        [C], N and D and, for the whitened forms, p^2 [C, k] and the part
        of y^T y outside the basis [C] (the residual is then summed from
        positive terms instead of by subtraction).
    published_rank: for ``legacy_evidence`` with N > D, how many
        eigenvalues the published code keeps (``published_rank``); None
        keeps all.

    The one place that chooses the backend: the compiled op when it serves
    the device and dtype (see ``torch_logme.extension_available``) and the
    spectrum's range, else the pure-torch loop.
    """
    args = (spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
            spec.whitened_sq, spec.outside_sq, published_rank)
    if (
        spec.eigenvalues.dtype in _COMPILED_DTYPES
        and _extension.extension_available(spec.eigenvalues.device)
        and _within_compiled_range(spec.eigenvalues)
    ):
        return _fixed_point_compiled(*args)
    return _fixed_point_torch(*args)


def _within_compiled_range(eigenvalues: Tensor) -> bool:
    """Whether the largest eigenvalue is where the compiled op's unscaled steps cannot overflow.

    (t + lam)^2 overflows float64 near lam = 1e154; the op takes no scale,
    so spectra far from 1 run in the pure-torch loop, which rescales exactly.
    """
    top = float(eigenvalues.amax()) if eigenvalues.numel() else 0.0
    return top == 0.0 or _COMPILED_RANGE[0] <= top <= _COMPILED_RANGE[1]


def _fixed_point_compiled(
    eigenvalues: Tensor,
    proj_sq: Tensor,
    target_sq: Tensor,
    num_samples: int,
    num_features: int,
    options: LogMEOptions,
    whitened_sq: Optional[Tensor],
    outside_sq: Optional[Tensor],
    published_rank: Optional[int] = None,
) -> FixedPointResult:
    """``fixed_point`` through the compiled op torch_logme::fixed_point (csrc/)."""
    strict = options.method == "icml"
    legacy = options.legacy_evidence and not strict  # the ICML code was already correct
    # Without weights the op adds D - k implicit zero eigenvalues, as below.
    weights, _ = _logdet_weights(eigenvalues, num_samples, num_features, legacy, published_rank)
    alpha, beta, t, evidence, steps = _extension.fixed_point_op(
        eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, weights,
        num_samples, num_features, options.max_iter, options.tol, strict,
    )
    return FixedPointResult(alpha, beta, t, evidence, steps)


def _fixed_point_torch(
    eigenvalues: Tensor,
    proj_sq: Tensor,
    target_sq: Tensor,
    num_samples: int,
    num_features: int,
    options: LogMEOptions,
    whitened_sq: Optional[Tensor],
    outside_sq: Optional[Tensor],
    published_rank: Optional[int] = None,
) -> FixedPointResult:
    """``fixed_point`` in plain torch ops: about ten small kernels per step.

    It runs on the spectrum divided by a power of two s near its largest
    eigenvalue, which is exact in floating point: with lam~ = lam / s and
    alpha~ = alpha / s every step is the published one scaled by s, except
    that its epsilon on ||m||^2 becomes epsilon * s. So eigenvalues near
    the ends of the dtype's range (features of magnitude 1e100 or 1e-100)
    give the published numbers instead of overflowing in (t + lam)^2.
    """
    scale = _power_of_two_near_max(eigenvalues)
    lam = eigenvalues / scale
    if whitened_sq is None:
        proj_sq = proj_sq / scale
    n = float(num_samples)
    num_columns = proj_sq.shape[0]
    like: Dict[str, Any] = dict(dtype=lam.dtype, device=lam.device)
    positive = lam > 0
    # A zero eigenvalue adds nothing to gamma: N - gamma = (N - #positive) + t sum_{lam > 0} r.
    free_dims = n - positive.sum().to(lam.dtype)
    alpha = torch.ones(num_columns, **like) / scale
    beta = torch.ones(num_columns, **like)
    t_used = torch.ones(num_columns, **like)
    m2 = torch.zeros(num_columns, **like)
    res2 = torch.zeros(num_columns, **like)
    steps = torch.zeros(num_columns, dtype=torch.int64, device=lam.device)
    active = torch.ones(num_columns, dtype=torch.bool, device=lam.device)
    strict = options.method == "icml"  # ICML stops on "< tol", JMLR on "<= tol"
    early_exit = lam.device.type == "cpu"  # a host read is free there

    for _ in range(options.max_iter):
        t = alpha / beta
        r = torch.reciprocal(t.unsqueeze(1) + lam)  # [C, k] 1 / (t + lam)
        gamma = r @ lam
        # No cancellation when t << lam (N <= D at a large scale), unlike n - gamma.
        free = free_dims + t * (r @ positive.to(lam.dtype))
        fit = (t.unsqueeze(1) * r).square_()  # (t / (t + lam))^2: in [0, 1], never underflows to 0 wrongly
        # 1 / (t + lam)^2, in place ([C, k] is the largest temporary), and 0 for a zero
        # eigenvalue: its 1 / t^2 may overflow, and no term needs it (z, or lam, is 0 there).
        r.mul_(r).masked_fill_(~positive, 0)
        if whitened_sq is None:
            q = r.mul_(proj_sq)
            m2_new = q.sum(1)
            # ||y - F m||^2 = y^T y - sum z^2 (lam + 2 t) / (t + lam)^2; clamp
            # the round-off of that difference so it never goes negative.
            res2_new = (target_sq - q @ lam - 2.0 * t * m2_new).clamp_min_(0)
        else:
            # Same quantities from p^2 = z^2 / lam, without a subtraction:
            # ||y - F m||^2 = outside + t^2 sum p^2 / (t + lam)^2.
            assert outside_sq is not None  # the whitened forms come with it (Spectrum)
            q = r.mul_(whitened_sq)
            m2_new = q @ lam
            res2_new = outside_sq + (fit.mul_(whitened_sq)).sum(1)
        alpha_new = gamma / (m2_new + EPSILON * scale)
        beta_new = free / (res2_new + EPSILON)
        change = (alpha_new / beta_new - t).abs() / t
        stop = change < options.tol if strict else change <= options.tol

        alpha = torch.where(active, alpha_new, alpha)
        beta = torch.where(active, beta_new, beta)
        m2 = torch.where(active, m2_new, m2)
        res2 = torch.where(active, res2_new, res2)
        t_used = torch.where(active, t, t_used)
        steps += active
        active &= ~stop
        if early_exit and not bool(active.any()):
            break

    if strict:  # the ICML code adds epsilon inside the evidence too
        m2 = m2 + EPSILON * scale
        res2 = res2 + EPSILON
    legacy = options.legacy_evidence and not strict  # the ICML code was already correct
    weights, zeros = _logdet_weights(lam, num_samples, num_features, legacy, published_rank)
    log_terms = torch.log(alpha.unsqueeze(1) + beta.unsqueeze(1) * lam)
    logdet = (log_terms if weights is None else log_terms * weights).sum(1)
    logdet = logdet + zeros * torch.log(alpha)
    # log s from log(alpha) and each log(alpha + beta lam): it cancels unless the legacy log-det drops terms.
    counted = lam.shape[0] if weights is None else weights.sum()
    unscaled = 0.5 * (num_features - counted - zeros) * torch.log(scale)
    evidence = (
        0.5 * num_features * torch.log(alpha)
        + 0.5 * n * torch.log(beta)
        - 0.5 * logdet
        - 0.5 * beta * res2
        - 0.5 * alpha * m2
        - 0.5 * n * math.log(2 * math.pi)
        + unscaled
    ) / n
    return FixedPointResult(alpha * scale, beta, t_used * scale, evidence, steps)


def _power_of_two_near_max(values: Tensor) -> Tensor:
    """0-dim: 2^e with values.max() in [2^(e-1), 2^e), or 1 when the max is not positive (no host read)."""
    top = values.amax()
    _, exponent = torch.frexp(top)
    # A float exponent: torch 2.4 (CI's oldest) computes ldexp with an int exponent as an
    # integer power of two, which overflows past 2**31.
    scale = torch.ldexp(torch.ones_like(top), exponent.to(top.dtype))
    return torch.where(top > 0, scale, torch.ones_like(top))


def roundoff_error(spec: "Spectrum", result: FixedPointResult) -> Tensor:
    """[C] a first-order bound on how far each column's evidence may be off from round-off in ``spec``.

    At the fixed point, d(N * evidence) / d(lam_i) = (alpha p_i^2 / (t + lam_i) - 1) / (2 (t + lam_i)),
    with t = alpha / beta and p_i^2 = z_i^2 / lam_i the whitened projection.
    Each eigenvalue is uncertain by its ``noise``; one that was not resolved
    (set to 0) by all the range it was cut from, with the z it had. Nearly
    equal eigenvalues mix their eigenvectors by as much: a factor 2.
    """
    lam, noise = spec.eigenvalues, spec.noise
    assert noise is not None  # every decomposition in spectrum.py sets it
    t = (result.alpha / result.beta).unsqueeze(1)  # [C, 1]
    unresolved = lam <= 0
    dims = max(lam.shape[0], spec.num_samples)
    spread = torch.where(unresolved, dims * noise, noise)  # [k]
    if spec.whitened_sq is not None:
        p_sq = spec.whitened_sq
    else:
        z_sq = spec.proj_sq if spec.dropped_sq is None else spec.proj_sq + spec.dropped_sq
        p_sq = z_sq / torch.where(unresolved, spread, lam).clamp_min(torch.finfo(lam.dtype).tiny)
    denom = t + lam
    slope = (1 + result.alpha.unsqueeze(1) * p_sq / denom) / (2 * denom)
    return 2 * (slope * spread).sum(1) / spec.num_samples
