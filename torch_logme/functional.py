"""Functional LogME: tensors in, a score tensor out.

This function, the LogME estimator and the accumulator are thin layers over
the same stages: inputs -> sufficient statistics -> spectrum -> fixed point.
LogME's compute stage is ``compute_evidence``: the accumulator runs it on its
sums; ``logme`` runs it once on the whole data set, whose rows the N <= D
and precise routes read.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import spectrum as _spectrum
from ._checks import Inputs, check_class_count, prepare
from ._options import LogMEOptions, logme_options
from ._validators import one_of
from .evidence import FixedPointResult, fixed_point, published_rank, roundoff_error
from .sums import SufficientStatistics, compute_statistics

REDUCTIONS = ("mean", "sum", "none")

#: How close to exact the evidence must be, relative to its size, by the
#: first-order round-off bound (``evidence.roundoff_error``), before the
#: fast route's result is returned; past it, the precise route runs.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _legacy_rank(
    options: LogMEOptions, n: int, d: int, gram: Callable[[], "Tensor | np.ndarray"]
) -> Optional[int]:
    """The published code's rank cut-off, where ``legacy_evidence`` needs it (fixed point, N > D)."""
    if not options.legacy_evidence or options.method == "icml" or n <= d:
        return None
    return published_rank(gram())


def _attempt(
    decompose: Callable[[], _spectrum.Spectrum], options: LogMEOptions, rtol: Optional[float],
    rank: Optional[int] = None,
) -> Tuple[Optional[_spectrum.Spectrum], Optional[FixedPointResult], bool]:
    """(spectrum, result, trusted) of one route; a decomposition that fails to converge is untrusted.

    ``rtol=None`` takes the result whatever its bound (the last route);
    ``rank``: the published rank cut-off for ``legacy_evidence``.
    """
    try:
        spec = decompose()
    except torch.linalg.LinAlgError:  # non-finite or pathological sums: let the next route try
        return None, None, False
    result = fixed_point(spec, options, rank)
    if rtol is None:
        return spec, result, True
    error = roundoff_error(spec, result)
    ok = torch.isfinite(result.evidence) & (error <= rtol * result.evidence.abs())
    return spec, result, bool(ok.all())


def _finite(
    spec: Optional[_spectrum.Spectrum], result: Optional[FixedPointResult], magnitude: str
) -> Tuple[_spectrum.Spectrum, FixedPointResult]:
    if spec is None or result is None or not bool(torch.isfinite(result.evidence).all()):
        raise ValueError(
            f"LogME has no finite value for these features{magnitude}: no route (eigh, or the SVD of "
            "the precise route) gave one; if their magnitude is extreme, divide them by a constant "
            "(LogME ranks rescaled features nearly alike)"
        )
    return spec, result


def _in_float64(options: LogMEOptions) -> LogMEOptions:
    warnings.warn(
        "float32 cannot resolve these features (offset, badly scaled or ill-conditioned: the round-off "
        "bound of the float32 result is past 1e-4): LogME is recomputed in float64. Pass "
        "dtype=torch.float64 to skip the float32 attempt.",
        RuntimeWarning,
        stacklevel=4,
    )
    return options.in_dtype(torch.float64)


def _cast(result: FixedPointResult, dtype: torch.dtype) -> FixedPointResult:
    """The result in ``dtype``, but t: it is read only with the (float64) spectrum, for posterior
    means, and features that need float64 have a t that float32 may round to 0."""
    return FixedPointResult(
        result.alpha.to(dtype), result.beta.to(dtype), result.t, result.evidence.to(dtype), result.steps
    )


def _magnitude(inputs: Inputs) -> str:
    return "" if inputs.magnitude is None else f" (largest magnitude {inputs.magnitude:.3g})"


def check_magnitude(inputs: Inputs, *, batch: bool = False) -> None:
    """Raise ValueError when the features are too large or too small for float64 sums (before any work).

    ``batch=True`` (one batch of a stream) checks only the upper bound: a
    batch of tiny features adds little to sums that other batches fill.
    """
    m = inputs.magnitude
    low = 0.0 if batch else MAGNITUDES[0]
    if m is not None and m > 0 and not low <= m <= MAGNITUDES[1]:
        raise ValueError(
            f"features have largest magnitude {m:.3g}, outside the {MAGNITUDES[0]:g} to {MAGNITUDES[1]:g} "
            "that LogME's float64 sums of squares can hold; divide them by a constant first "
            "(LogME ranks rescaled features nearly alike)"
        )


def solve(inputs: Inputs, options: LogMEOptions, *, with_basis: bool) -> Tuple[_spectrum.Spectrum, FixedPointResult]:
    """Run every stage on validated inputs; ``with_basis`` keeps what posterior means need.

    The one place that picks the route. The fast one (eigh of F^T F, or of
    F F^T when N <= D) is returned when the round-off bound says it is
    exact to ``RTOL``; otherwise the precise one runs (the factored SVD of
    ``spectrum.precise``, or the SVD of F when N <= D). In float32 a result
    past its bound is recomputed in float64, with a warning. The result is
    finite, or this raises ValueError.
    """
    check_magnitude(inputs)
    f, y, c = inputs.features, inputs.targets, inputs.num_columns
    cls = inputs.classification
    n, d = inputs.num_samples, inputs.num_features
    dtype = options.dtype

    def by_svd() -> _spectrum.Spectrum:
        return _spectrum.svd(f, y, c, cls, dtype, with_basis=with_basis)

    def published_gram() -> np.ndarray:
        """F^T F as the published code forms it (numpy, float64), for its rank cut-off."""
        x = f.detach().to(device="cpu", dtype=torch.float64).numpy()
        return x.transpose() @ x

    rank = _legacy_rank(options, n, d, published_gram)
    if options.solver == "svd":
        fast, precise = by_svd, None
    elif n <= d:
        fast, precise = (lambda: _spectrum.dual(f, y, c, cls, dtype, with_basis=with_basis)), by_svd
    else:
        # The fast route decomposes F^T F itself: in float64, plain sums (one pass, no
        # copy) lose nothing it keeps, and only the precise route pays for sums about the
        # mean. Float32 has 7 digits: an offset of 10x the spread already costs two of them
        # in plain sums, so there the fast route sums about the mean as well.
        stats = compute_statistics(f, y, c, cls, dtype, about_mean=dtype != torch.float64)
        fast = lambda: _spectrum.primal(stats, with_basis=with_basis)  # noqa: E731
        precise = lambda: _spectrum.precise(  # noqa: E731
            stats if stats.shift is not None else compute_statistics(f, y, c, cls, dtype),
            with_basis=with_basis,
        )
    spec, result, trusted = _attempt(fast, options, RTOL[dtype], rank)
    if trusted:
        assert spec is not None and result is not None  # a trusted attempt has both
        return spec, result
    if dtype != torch.float64:
        spec, result = solve(inputs, _in_float64(options), with_basis=with_basis)
        return spec, _cast(result, dtype)
    if precise is not None:
        spec, result, _ = _attempt(precise, options, None, rank)
    return _finite(spec, result, _magnitude(inputs))


def compute_evidence(state: Union[Inputs, SufficientStatistics], options: LogMEOptions) -> Tuple[Tensor, Tensor]:
    """LogME's compute stage: (evidence [C], y^T y per column [C]: the class counts when classifying) from its state.

    The state is the whole data set (validated inputs: the functional form's
    one update holds the rows, which the N <= D and precise routes read), or
    the sums over samples of an accumulator (the streaming route).
    """
    if isinstance(state, SufficientStatistics):
        return solve_statistics(state, options), state.target_sq
    spec, result = solve(state, options, with_basis=False)
    return result.evidence, spec.target_sq


def solve_statistics(stats: SufficientStatistics, options: LogMEOptions) -> Tensor:
    """[C] evidence from accumulated statistics (the streaming route), as ``solve`` picks it.

    Float32 sums cannot be recomputed in float64 (the features are gone):
    the precise route runs on them in float64, and when even that cannot be
    trusted to float32's bound, the error says to accumulate in float64.
    """
    rank = _legacy_rank(options, stats.num_samples, stats.gram.shape[0], stats.raw_gram)
    spec, result, trusted = _attempt(
        lambda: _spectrum.primal(stats, with_basis=False), options, RTOL[options.dtype], rank
    )
    if trusted:
        assert result is not None  # a trusted attempt has one
        return result.evidence
    if options.dtype == torch.float64:
        precise = _attempt(lambda: _spectrum.precise(stats, with_basis=False), options, None, rank)
        return _finite(precise[0], precise[1], "")[1].evidence

    def widened() -> _spectrum.Spectrum:
        wide = _spectrum.precise(stats.to(torch.float64), with_basis=False)
        # The sums themselves carry float32 round-off: the spectrum is no better than that.
        floor = torch.finfo(options.dtype).eps * wide.eigenvalues.amax()
        assert wide.noise is not None  # every decomposition in spectrum.py sets it
        return replace(wide, noise=torch.maximum(wide.noise, floor))

    _, result, trusted = _attempt(widened, options.in_dtype(torch.float64), RTOL[options.dtype], rank)
    if not trusted:
        raise ValueError(
            "the float32 sums of this accumulator cannot resolve these features (offset, badly scaled "
            "or ill-conditioned): accumulate with dtype=torch.float64"
        )
    assert result is not None  # a trusted attempt has one
    return result.evidence.to(options.dtype)


#: Largest magnitudes of features that LogME scores: beyond them F^T F or its
#: eigenvalues leave float64's range.
MAGNITUDES = (1e-150, 1e150)


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
    absent_classes: str = "count",
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
        dtype: see :class:`torch_logme.LogME`.
        device: see :class:`torch_logme.LogME`.
        max_iter: see :class:`torch_logme.LogME`.
        tol: see :class:`torch_logme.LogME`.
        method: see :class:`torch_logme.LogME`.
        solver: see :class:`torch_logme.LogME`.
        legacy_evidence: see :class:`torch_logme.LogME`.
        absent_classes: see :class:`torch_logme.LogME`.

    Returns:
        A tensor on the compute device in ``dtype``: the log evidence per
        sample. Larger is better; compare models only on the same data.
    """
    one_of(reduction, "reduction", REDUCTIONS)
    options = logme_options(
        dtype=dtype, device=device, max_iter=max_iter, tol=tol, method=method,
        solver=solver, legacy_evidence=legacy_evidence, absent_classes=absent_classes,
    )
    inputs = prepare(
        features, targets, regression=regression, num_classes=num_classes, device=options.device
    )
    if num_classes is None:  # an explicit num_classes is the caller's choice: no second-guessing
        check_classes(inputs)
    with torch.no_grad():
        evidence, counts = compute_evidence(inputs, options)
    return reduce_columns(evidence, counts, inputs.classification, options, reduction)


def check_classes(inputs: Inputs) -> None:
    """``check_class_count`` for LogME's per-class state (C x D) when the labels set C."""
    if inputs.classification:
        check_class_count(
            inputs.num_columns, inputs.num_samples, inputs.num_columns * inputs.num_features,
            "LogME's per-class state (C x D)",
        )


def reduce_columns(
    evidence: Tensor, counts: Tensor, classification: bool, options: LogMEOptions, reduction: str
) -> Tensor:
    """The score from per-column evidence [C], given the class counts [C] (classification).

    A label id below the largest that never occurs is a class with no
    samples: the published code scores it (a column of zeros fits any
    features, so its evidence is high and lifts the mean). That stays the
    default, with a warning; ``absent_classes="skip"`` leaves such columns
    out ("none" then returns the present classes only).
    """
    one_of(reduction, "reduction", REDUCTIONS)
    if classification:
        absent = counts == 0
        if bool(absent.any()):
            ids = absent.nonzero().flatten().tolist()
            shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
            if options.absent_classes == "skip":
                evidence = evidence[~absent]
            else:
                warnings.warn(
                    f"class ids {shown} never occur in the labels ({len(ids)} of {counts.numel()}); each still "
                    "counts as a class, as in the published code, and raises the mean score. Pass "
                    "absent_classes='skip' to score only the classes present, or relabel 0..C-1.",
                    UserWarning,
                    stacklevel=3,
                )
    if reduction == "none":
        return evidence
    return evidence.mean() if reduction == "mean" else evidence.sum()
