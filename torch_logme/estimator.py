"""LogME estimator: a drop-in for the published class, on any device."""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import as_tensor, prepare
from ._options import logme_options
from ._validators import boolean
from .functional import check_classes, reduce_columns, solve


class LogME:
    """LogME (You et al., ICML 2021; JMLR 2022), batched over classes.

    ``LogME(regression=False).fit(f, y)`` returns the same score as the
    published ``LogME.fit`` (the correct evidence by default, see
    ``legacy_evidence``). The score is the log evidence per sample: larger is
    better, it can be positive, negative or above 1, and it compares models
    only on the same data.

    Args:
        regression: False for integer class labels, True for float targets
            [N] or [N, C] (multi-label: 0/1 columns).
        dtype: compute precision, torch.float64 (default) or torch.float32.
        device: where to compute; default where the features are.
        max_iter: at most this many fixed-point updates (published: 11).
        tol: stopping tolerance on the relative change of alpha/beta; None is
            the method's published value (1e-3 fixed_point, 1e-2 icml).
        method: "fixed_point" (JMLR 2022, the published default) or "icml".
        solver: "eigh" (Gram matrix, or F F^T when N <= D) or "svd" (of F).
        legacy_evidence: True reproduces the published fixed-point code,
            whose log-determinant sums over only rank(F) eigenvalues (wrong
            when N < D; the ICML code is already correct, so it has no effect
            there).
        absent_classes: "count" (default, as published, with a warning) or
            "skip": what a label id below the largest that never occurs
            does to the score. With "skip" ``fit`` averages the classes
            present; the per-class attributes still have every id, so
            ``predict`` keeps its class ids.

    Attributes after ``fit`` (tensors on the compute device):
        alphas, betas, evidences: [C]; ms: [C, D] posterior means; num_dim: C.
    """

    def __init__(
        self,
        regression: bool = False,
        *,
        dtype: torch.dtype = torch.float64,
        device: Union[str, torch.device, None] = None,
        max_iter: int = 11,
        tol: Optional[float] = None,
        method: str = "fixed_point",
        solver: str = "eigh",
        legacy_evidence: bool = False,
        absent_classes: str = "count",
    ) -> None:
        self.regression = boolean(regression, "regression")
        self.options = logme_options(
            dtype=dtype, device=device, max_iter=max_iter, tol=tol, method=method,
            solver=solver, legacy_evidence=legacy_evidence, absent_classes=absent_classes,
        )
        self.fitted = False
        self.reset()

    def reset(self) -> None:
        """Forget the last fit."""
        self.num_dim = 0
        self.alphas: Optional[Tensor] = None
        self.betas: Optional[Tensor] = None
        self.evidences: Optional[Tensor] = None
        self.ms: Optional[Tensor] = None

    def fit(self, f: Any, y: Any) -> float:
        """Fit on features f [N, D] and targets y; return the LogME score.

        y: class ids [N] (classification) or float targets [N] / [N, C].
        """
        inputs = prepare(f, y, regression=self.regression, num_classes=None, device=self.options.device)
        check_classes(inputs)
        if self.fitted:
            # stacklevel=1 as the published estimator, which this is a drop-in for.
            warnings.warn("re-fitting for new data. old parameters cleared.", stacklevel=1)
            self.reset()
        else:
            self.fitted = True
        with torch.no_grad():
            spec, result = solve(inputs, self.options, with_basis=True)
            # In float32 mode a fallback to float64 keeps a float64 spectrum: means in the asked dtype.
            ms = spec.posterior_means(result.t.to(spec.eigenvalues.dtype))
            narrow = spec.eigenvalues.dtype != torch.float64
            if narrow and not bool(torch.isfinite(ms).all() & (result.t >= torch.finfo(ms.dtype).tiny).all()):
                # Tiny features: float32 holds the evidence, but alpha / beta (and the squared
                # features) underflow to 0, and the means' 1 / (t + lam) to Inf. They need float64.
                wide_spec, wide = solve(inputs, self.options.in_dtype(torch.float64), with_basis=True)
                ms = wide_spec.posterior_means(wide.t)
            self.ms = ms.to(self.options.dtype)
            score = reduce_columns(result.evidence, spec.target_sq, inputs.classification, self.options, "mean")
        self.num_dim = inputs.num_columns
        self.alphas, self.betas, self.evidences = result.alpha, result.beta, result.evidence
        return float(score)

    def predict(self, f: Any) -> Union[Tensor, np.ndarray]:
        """Class ids [M] (classification) or values [M, C] (regression) for f [M, D].

        Returns a numpy array for numpy input (as the published class does),
        else a tensor on the compute device.
        """
        if self.ms is None:
            raise RuntimeError("LogME.predict called before fit")
        x = as_tensor(f, "features")
        if x.dim() != 2 or x.shape[1] != self.ms.shape[1]:
            raise ValueError(
                f"features must be [M, {self.ms.shape[1]}] like the fitted ones, got shape {tuple(x.shape)}"
            )
        with torch.no_grad():
            logits = x.to(device=self.ms.device, dtype=self.ms.dtype) @ self.ms.T
            # One host read: NaN/Inf rows, or logits past the dtype's range, would otherwise give
            # an arbitrary class id (argmax of NaN) or an infinite prediction.
            finite = torch.stack([torch.isfinite(x).all().to(logits.device), torch.isfinite(logits).all()])
            finite_x, finite_logits = finite.tolist()
            if not finite_x:
                raise ValueError("features contain NaN or Inf; expected finite values")
            if not finite_logits:
                raise ValueError(
                    f"the predictions overflow {self.ms.dtype} (features far larger than the fitted ones, "
                    "or posterior means past its range); fit with dtype=torch.float64"
                )
            out = logits if self.regression else logits.argmax(dim=-1)
        return out.cpu().numpy() if isinstance(f, np.ndarray) else out
