"""The options shared by every LogME entry point, validated once.

Estimator, functional API and (later) the streaming accumulator all take the
same keywords; this module turns them into one frozen record so that the
stages below never see an unchecked value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

METHODS = ("fixed_point", "icml")
ABSENT_CLASSES = ("count", "skip")
SOLVERS = ("eigh", "svd")
DTYPES = (torch.float32, torch.float64)

# The published stopping tolerances: relative change of alpha/beta.
DEFAULT_TOL = {"fixed_point": 1e-3, "icml": 1e-2}


@dataclass(frozen=True)
class ScoreOptions:
    """Validated LogME options.

    dtype: precision of the Gram matrix, the eigendecomposition and the fixed
        point (float64 by default, whatever the input dtype).
    device: where to compute; None means where the features are.
    max_iter: at most this many fixed-point updates (published: 11).
    tol: relative change of alpha/beta that stops a column.
    method: "fixed_point" (JMLR 2022, the published default) or "icml" (ICML 2021).
    solver: "eigh" (of the Gram matrix, or of F F^T when N <= D) or "svd" (of F).
    legacy_evidence: reproduce the published fixed-point code's log-determinant,
        which sums over only rank(F) eigenvalues (wrong when N < D).
    absent_classes: "count" (as published: a label id below the largest
        that never occurs is still a class, with a high evidence) or "skip"
        (score only the classes present).
    """

    dtype: torch.dtype = torch.float64
    device: Optional[torch.device] = None
    max_iter: int = 11
    tol: float = 1e-3
    method: str = "fixed_point"
    solver: str = "eigh"
    legacy_evidence: bool = False
    absent_classes: str = "count"


def make_options(
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
    max_iter: int = 11,
    tol: Optional[float] = None,
    method: str = "fixed_point",
    solver: str = "eigh",
    legacy_evidence: bool = False,
    absent_classes: str = "count",
) -> ScoreOptions:
    """Check every option and return them as one ScoreOptions.

    Raises ValueError (or TypeError for a wrong type) naming the option and
    what it accepts. ``tol=None`` picks the method's published tolerance.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol is None:
        tol = DEFAULT_TOL[method]
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0 or tol != tol:
        raise ValueError(f"tol must be a positive float, got {tol!r}")
    if absent_classes not in ABSENT_CLASSES:
        raise ValueError(f"absent_classes must be one of {ABSENT_CLASSES}, got {absent_classes!r}")
    if not isinstance(legacy_evidence, bool):
        raise TypeError(f"legacy_evidence must be a bool, got {type(legacy_evidence).__name__}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
    return ScoreOptions(dtype, device, max_iter, float(tol), method, solver, legacy_evidence, absent_classes)
