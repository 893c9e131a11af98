"""Options, validated once into frozen records, in two kinds.

``ComputeOptions`` (dtype, device) is what every score takes.
``LogMEOptions`` adds LogME's own solver settings (fixed-point iterations,
tolerance, method, solver, legacy log-determinant, absent classes) and
carries a ``ComputeOptions``. The stages below never see an unchecked value.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

from ._validators import boolean, one_of, positive_float, positive_int

METHODS = ("fixed_point", "icml")
ABSENT_CLASSES = ("count", "skip")
SOLVERS = ("eigh", "svd")
DTYPES = (torch.float32, torch.float64)

#: Largest ``max_iter``: far past any fixed point's convergence (the published value is 11),
#: and within the op's int64 argument, which a larger Python int would overflow with a confusing error.
MAX_ITER = 10**6

# The published stopping tolerances: relative change of alpha/beta.
DEFAULT_TOL = {"fixed_point": 1e-3, "icml": 1e-2}

Device = Union[str, torch.device, None]


@dataclass(frozen=True)
class ComputeOptions:
    """Where and in what precision a score is computed.

    dtype: precision of the sums and of every later stage (float64 by
        default, whatever the input dtype).
    device: where to compute; None means where the inputs are.
    """

    dtype: torch.dtype = torch.float64
    device: Optional[torch.device] = None


@dataclass(frozen=True)
class LogMEOptions:
    """Validated LogME options: the compute options and the solver's settings.

    compute: dtype and device (see ComputeOptions).
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

    compute: ComputeOptions = field(default_factory=ComputeOptions)
    max_iter: int = 11
    tol: float = 1e-3
    method: str = "fixed_point"
    solver: str = "eigh"
    legacy_evidence: bool = False
    absent_classes: str = "count"

    @property
    def dtype(self) -> torch.dtype:
        return self.compute.dtype

    @property
    def device(self) -> Optional[torch.device]:
        return self.compute.device

    def in_dtype(self, dtype: torch.dtype) -> "LogMEOptions":
        """The same options computing in ``dtype`` (float32 results recomputed in float64)."""
        return replace(self, compute=replace(self.compute, dtype=dtype))


def compute_options(*, dtype: torch.dtype = torch.float64, device: Device = None) -> ComputeOptions:
    """Check ``dtype`` and ``device``; ValueError naming the option and what it accepts."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
        try:
            # An empty tensor is the cheapest probe of whether torch can use the device at all:
            # without it an unavailable one fails later with torch's raw AssertionError/RuntimeError.
            torch.empty(0, device=device)
        except (AssertionError, RuntimeError) as err:
            raise ValueError(f"device {str(device)!r} cannot be used, it is not available: {err}") from err
    return ComputeOptions(dtype, device)


def logme_options(
    *,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    max_iter: int = 11,
    tol: Optional[float] = None,
    method: str = "fixed_point",
    solver: str = "eigh",
    legacy_evidence: bool = False,
    absent_classes: str = "count",
) -> LogMEOptions:
    """Check every LogME option and return them as one LogMEOptions.

    Raises ValueError (or TypeError for a wrong type) naming the option and
    what it accepts. ``tol=None`` picks the method's published tolerance.
    """
    one_of(method, "method", METHODS)
    one_of(solver, "solver", SOLVERS)
    compute = compute_options(dtype=dtype, device=device)
    positive_int(max_iter, "max_iter", maximum=MAX_ITER)
    tol = positive_float(DEFAULT_TOL[method] if tol is None else tol, "tol")
    one_of(absent_classes, "absent_classes", ABSENT_CLASSES)
    boolean(legacy_evidence, "legacy_evidence")
    return LogMEOptions(compute, max_iter, tol, method, solver, legacy_evidence, absent_classes)
