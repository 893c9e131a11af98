"""Functional LogME: tensors in, a score tensor out.

Both this function and the LogME estimator are thin layers over the same
stages: inputs -> sufficient statistics -> spectrum -> fixed point.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from . import spectrum as _spectrum
from ._checks import Inputs, prepare
from ._options import ScoreOptions, make_options
from .evidence import FixedPointResult, fixed_point
from .statistics import compute_statistics

REDUCTIONS = ("mean", "sum", "none")


def solve(inputs: Inputs, options: ScoreOptions, *, with_basis: bool) -> Tuple[_spectrum.Spectrum, FixedPointResult]:
    """Run every stage on validated inputs; ``with_basis`` keeps what posterior means need."""
    f, y, c = inputs.features, inputs.targets, inputs.num_columns
    cls = inputs.classification
    if options.solver == "svd":
        spec = _spectrum.svd(f, y, c, cls, options.dtype, with_basis=with_basis)
    elif inputs.num_samples <= inputs.num_features:
        spec = _spectrum.dual(f, y, c, cls, options.dtype, with_basis=with_basis)
    else:
        stats = compute_statistics(f, y, c, cls, options.dtype)
        spec = _spectrum.primal(stats, with_basis=with_basis)
    result = fixed_point(
        spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
        whitened_sq=spec.whitened_sq, outside_sq=spec.outside_sq,
    )
    return spec, result


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
