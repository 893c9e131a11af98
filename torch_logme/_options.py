"""The options shared by every LogME entry point, validated once.

Estimator, functional API and (later) the streaming accumulator all take the
same keywords; this module turns them into one frozen record so that the
stages below never see an unchecked value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._validators import boolean, one_of, positive_float, positive_int

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
    one_of(method, "method", METHODS)
    one_of(solver, "solver", SOLVERS)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    positive_int(max_iter, "max_iter")
    tol = positive_float(DEFAULT_TOL[method] if tol is None else tol, "tol")
    one_of(absent_classes, "absent_classes", ABSENT_CLASSES)
    boolean(legacy_evidence, "legacy_evidence")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
    return ScoreOptions(dtype, device, max_iter, tol, method, solver, legacy_evidence, absent_classes)
