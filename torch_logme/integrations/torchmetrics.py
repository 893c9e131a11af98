"""LogME as a torchmetrics ``Metric`` (optional: ``pip install torch_logme[torchmetrics]``).

The metric keeps the same sums as :class:`torch_logme.LogMEAccumulator`
(F^T F [D, D], per-class sums [C, D], y^T y [C], N), registered with
``dist_reduce_fx="sum"`` so that torchmetrics' own synchronisation adds them
across processes, and scores them with the accumulator's compute step.
torchmetrics states have fixed shapes, so the number of classes (or of
regression targets) must be given up front.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

try:
    from torchmetrics import Metric
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_logme.integrations.torchmetrics needs torchmetrics: pip install 'torch_logme[torchmetrics]'"
    ) from err

from ..functional import REDUCTIONS
from ..statistics import SufficientStatistics
from ..streaming import LogMEAccumulator


class LogMEMetric(Metric):
    """LogME of all batches seen, as a torchmetrics metric.

    Args:
        num_features: D.
        num_classes: C, required for classification (states cannot grow).
        regression: float targets [B] or [B, K] instead of labels.
        num_targets: K, required with ``regression=True``.
        reduction: what ``compute()`` returns: "mean" (the score, 0-dim),
            "sum", or "none" (one score per column, [C]).
        dtype: precision of the sums and of compute (default float64).
        check_inputs, max_iter, tol, method, legacy_evidence: as for
            :class:`torch_logme.LogMEAccumulator`.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ``dist_sync_fn``, ...).

    Use ``update(features [B, D], labels [B])`` per batch and ``compute()``
    per epoch. Calling the metric (``forward``) also scores the batch alone,
    which costs one eigendecomposition and needs B >= 2.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int] = None,
        *,
        regression: bool = False,
        num_targets: Optional[int] = None,
        reduction: str = "mean",
        dtype: torch.dtype = torch.float64,
        check_inputs: bool = True,
        max_iter: int = 11,
        tol: Optional[float] = None,
        method: str = "fixed_point",
        legacy_evidence: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        columns = num_targets if regression else num_classes
        if columns is None:
            needed = "num_targets (with regression=True)" if regression else "num_classes"
            raise ValueError(f"LogMEMetric needs {needed}: torchmetrics states have fixed shapes")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        # Holds the checked options and the compute step; its own sums stay unused.
        self._scorer = LogMEAccumulator(
            num_features, num_classes, regression=regression, num_targets=num_targets, dtype=dtype,
            sync_on_compute=False, check_inputs=check_inputs, max_iter=max_iter, tol=tol, method=method,
            legacy_evidence=legacy_evidence,
        )
        self.num_features = num_features
        self.num_columns = columns
        self.regression = regression
        self.reduction = reduction
        self.check_inputs = check_inputs
        self.add_state("gram", torch.zeros(num_features, num_features, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("cross", torch.zeros(columns, num_features, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("target_sq", torch.zeros(columns, dtype=dtype), dist_reduce_fx="sum")
        # An integer count sums exactly across processes.
        self.add_state("num_samples", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, features: Any, targets: Any) -> None:
        """Add a batch: features [B, D]; labels [B] in [0, C), or targets [B] / [B, K]."""
        inputs = self._scorer.check_batch(features, targets, self.gram.device)
        if inputs.num_columns != self.num_columns:
            raise ValueError(f"targets have {inputs.num_columns} columns, expected num_targets={self.num_columns}")
        # The statistics object wraps the state tensors, so add_ writes into them.
        stats = SufficientStatistics(self.gram, self.cross, self.target_sq, 0)
        stats.add_(inputs.features, inputs.targets, not self.regression)
        self.num_samples += inputs.num_samples

    def compute(self) -> Tensor:
        """LogME of every batch since the last reset: 0-dim, or [C] with reduction="none"."""
        states = {
            "gram": self.gram, "cross": self.cross, "target_sq": self.target_sq, "num_samples": self.num_samples,
        }
        return self._scorer._compute(states, reduction=self.reduction)
