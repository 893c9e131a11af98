"""Functional LogME: tensors in, a score tensor out.

Both this function and the LogME estimator are thin layers over the same
stages: inputs -> sufficient statistics -> spectrum -> fixed point.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from . import spectrum as _spectrum
from ._checks import Inputs, prepare
from ._options import ScoreOptions, make_options
from .evidence import FixedPointResult, fixed_point, roundoff_error
from .statistics import SufficientStatistics, compute_statistics

REDUCTIONS = ("mean", "sum", "none")

#: How close to exact the evidence must be, relative to its size, by the
#: first-order round-off bound (``evidence.roundoff_error``), before the
#: fast route's result is returned; past it, the precise route runs.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _fixed_point(spec: _spectrum.Spectrum, options: ScoreOptions) -> FixedPointResult:
    return fixed_point(
        spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
        whitened_sq=spec.whitened_sq, outside_sq=spec.outside_sq, raw_eigenvalues=spec.raw_eigenvalues,
    )


def _trusted(spec: _spectrum.Spectrum, result: FixedPointResult, rtol: float) -> bool:
    """Whether every column's evidence is finite and within ``rtol`` of exact, by the round-off bound."""
    error = roundoff_error(spec, result)
    ok = torch.isfinite(result.evidence) & (error <= rtol * result.evidence.abs())
    return bool(ok.all())


def _finite(result: FixedPointResult) -> FixedPointResult:
    if not bool(torch.isfinite(result.evidence).all()):
        raise ValueError(
            "LogME is not finite for these features: their scale is outside what float64 sums can "
            "hold (about 1e-100 to 1e100 in magnitude); rescale the features"
        )
    return result


def _in_float64(options: ScoreOptions, reason: str) -> ScoreOptions:
    warnings.warn(
        f"float32 cannot resolve these features ({reason}): LogME is recomputed in float64. "
        "Pass dtype=torch.float64 to skip the float32 attempt.",
        RuntimeWarning,
        stacklevel=4,
    )
    return replace(options, dtype=torch.float64)


def _cast(result: FixedPointResult, dtype: torch.dtype) -> FixedPointResult:
    return FixedPointResult(
        result.alpha.to(dtype), result.beta.to(dtype), result.t.to(dtype), result.evidence.to(dtype), result.steps
    )


def solve(inputs: Inputs, options: ScoreOptions, *, with_basis: bool) -> Tuple[_spectrum.Spectrum, FixedPointResult]:
    """Run every stage on validated inputs; ``with_basis`` keeps what posterior means need.

    The one place that picks the route. The fast one (eigh of F^T F, or of
    F F^T when N <= D) is returned when the round-off bound says it is
    exact to ``RTOL``; otherwise the precise one runs (the factored SVD of
    ``spectrum.precise``, or the SVD of F when N <= D). In float32 a result
    past its bound is recomputed in float64, with a warning.
    """
    f, y, c = inputs.features, inputs.targets, inputs.num_columns
    cls = inputs.classification
    n, d = inputs.num_samples, inputs.num_features
    stats = None
    if options.solver == "svd":
        spec = _spectrum.svd(f, y, c, cls, options.dtype, with_basis=with_basis)
    elif n <= d:
        spec = _spectrum.dual(f, y, c, cls, options.dtype, with_basis=with_basis)
    else:
        stats = compute_statistics(f, y, c, cls, options.dtype)
        spec = _spectrum.primal(stats, with_basis=with_basis)
    result = _fixed_point(spec, options)
    if _trusted(spec, result, RTOL[options.dtype]):
        return spec, result
    if options.dtype != torch.float64:
        spec, result = solve(inputs, _in_float64(options, "its round-off bound is past 1e-4"), with_basis=with_basis)
        return spec, _cast(result, options.dtype)
    if options.solver == "svd":
        return spec, _finite(result)
    if stats is None:
        spec = _spectrum.svd(f, y, c, cls, options.dtype, with_basis=with_basis)
    else:
        spec = _spectrum.precise(stats, with_basis=with_basis)
    return spec, _finite(_fixed_point(spec, options))


def solve_statistics(stats: SufficientStatistics, options: ScoreOptions) -> Tensor:
    """[C] evidence from accumulated statistics (the streaming route), as ``solve`` picks it.

    Float32 sums cannot be recomputed in float64 (the features are gone):
    the precise route runs on them in float64, and when even that cannot be
    trusted to float32's bound, the error says to accumulate in float64.
    """
    spec = _spectrum.primal(stats, with_basis=False)
    result = _fixed_point(spec, options)
    if _trusted(spec, result, RTOL[options.dtype]):
        return result.evidence
    if options.dtype == torch.float64:
        return _finite(_fixed_point(_spectrum.precise(stats, with_basis=False), options)).evidence
    wide = replace(options, dtype=torch.float64)
    spec = _spectrum.precise(stats.to(torch.float64), with_basis=False)
    # The sums themselves carry float32 round-off: the spectrum is no better than that.
    floor = torch.finfo(options.dtype).eps * spec.eigenvalues.amax()
    spec = replace(spec, noise=torch.maximum(spec.noise, floor))
    result = _fixed_point(spec, wide)
    if not _trusted(spec, result, RTOL[options.dtype]):
        raise ValueError(
            "the float32 sums of this accumulator cannot resolve these features (offset, badly scaled "
            "or ill-conditioned): accumulate with dtype=torch.float64"
        )
    return result.evidence.to(options.dtype)


def logme(
    features: Any,
    targets: Any,
    *,
    regression: bool = False,
    num_classes: Optional[int] = None,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
    max_iter: int = 11,
    tol: Optional[float] = None,
    method: str = "fixed_point",
    solver: str = "eigh",
    legacy_evidence: bool = False,
) -> Tensor:
    """LogME score of features for a labelled task (You et al., ICML 2021 / JMLR 2022).

    Args:
        features: [N, D] tensor or numpy array, any float dtype, any device.
        targets: class ids [N] (classification) or float targets [N] / [N, C]
            (``regression=True``; multi-label is 0/1 columns).
        num_classes: number of classes; default ``targets.max() + 1`` (as the
            published code counts them: absent ids below the maximum still
            count as classes).
        reduction: "mean" (the LogME score, 0-dim), "sum", or "none" ([C], one
            score per class or target column).
        dtype, device, max_iter, tol, method, solver, legacy_evidence: see
            :class:`torch_logme.LogME`.

    Returns:
        A tensor on the compute device in ``dtype``: the log evidence per
        sample. Larger is better; compare models only on the same data.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    options = make_options(
        dtype=dtype, device=device, max_iter=max_iter, tol=tol, method=method,
        solver=solver, legacy_evidence=legacy_evidence,
    )
    inputs = prepare(
        features, targets, regression=regression, num_classes=num_classes, device=options.device
    )
    with torch.no_grad():
        _, result = solve(inputs, options, with_basis=False)
    if reduction == "none":
        return result.evidence
    return result.evidence.mean() if reduction == "mean" else result.evidence.sum()
