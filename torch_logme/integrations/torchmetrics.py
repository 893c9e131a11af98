"""LogME as a torchmetrics ``Metric`` (optional: ``pip install torch_logme[torchmetrics]``).

The metric keeps the same sums as :class:`torch_logme.LogMEAccumulator`
(see ``SufficientStatistics``: sums of the features minus a shift taken
from the first batch), and scores them with the accumulator's compute step.
Each process may have its own shift, so the states carry a leading axis of
one and are registered with ``dist_reduce_fx="cat"``: torchmetrics' own
synchronisation (and ``merge_state``) stacks the processes' sums, and
``compute`` brings them to one shift, exactly, before adding them.
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
from ..sums import SufficientStatistics
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
        check_inputs, max_iter, tol, method, legacy_evidence, absent_classes: as for
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
        absent_classes: str = "count",
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
            legacy_evidence=legacy_evidence, absent_classes=absent_classes,
        )
        self.num_features = num_features
        self.num_columns = columns
        self.regression = regression
        self.reduction = reduction
        self.check_inputs = check_inputs
        dims = {
            "gram": (num_features, num_features), "feature_sum": (num_features,),
            "cross": (columns, num_features), "target_sum": (columns,), "target_sq": (columns,),
            "shift": (num_features,),
        }
        self._dims = dict(dims, num_samples=(), has_shift=())
        for name, shape in dims.items():
            self.add_state(name, torch.zeros(1, *shape, dtype=dtype), dist_reduce_fx="cat")
        # Integer counts stack exactly; has_shift marks the parts whose shift is set.
        self.add_state("num_samples", torch.zeros(1, dtype=torch.int64), dist_reduce_fx="cat")
        self.add_state("has_shift", torch.zeros(1, dtype=torch.bool), dist_reduce_fx="cat")
        self._shift_set = False

    def reset(self) -> None:
        """Forget every batch (the next one sets a new shift)."""
        super().reset()
        self._shift_set = False

    def _parts(self) -> "list[SufficientStatistics]":
        """The statistics of each part of the states (one, or one per process after a sync)."""
        # A synced state is [processes, 1, ...] (torchmetrics stacks, then concatenates).
        s = {name: getattr(self, name).reshape(-1, *shape) for name, shape in self._dims.items()}
        return [
            SufficientStatistics(
                s["gram"][k], s["feature_sum"][k], s["cross"][k], s["target_sum"][k], s["target_sq"][k],
                int(s["num_samples"][k]), s["shift"][k] if bool(s["has_shift"][k]) else None,
            )
            for k in range(s["gram"].shape[0])
        ]

    def update(self, features: Any, targets: Any) -> None:
        """Add a batch: features [B, D]; labels [B] in [0, C), or targets [B] / [B, K]."""
        inputs = self._scorer.check_batch(features, targets, self.gram.device)
        if inputs.num_columns != self.num_columns:
            raise ValueError(f"targets have {inputs.num_columns} columns, expected num_targets={self.num_columns}")
        if not self._shift_set:  # a Python flag: no host read per batch
            self.shift[0] = inputs.features.sum(0, dtype=self.gram.dtype) / inputs.num_samples
            self.has_shift[0] = True
            self._shift_set = True
        # The statistics wrap the state tensors (part 0), so add_ writes into them.
        stats = SufficientStatistics(
            self.gram[0], self.feature_sum[0], self.cross[0], self.target_sum[0], self.target_sq[0], 0,
            self.shift[0],
        )
        stats.add_(inputs.features, inputs.targets, not self.regression)
        self.num_samples += inputs.num_samples

    def compute(self) -> Tensor:
        """LogME of every batch since the last reset: 0-dim, or [C] with reduction="none"."""
        parts = self._parts()
        shifted = [p.shift for p in parts if p.shift is not None]
        total = parts[0] if not shifted else None
        if shifted:
            common = torch.stack(shifted).mean(0)
            for part in parts:
                part = part.recentred_by(part.shift - common) if part.shift is not None else part
                total = part if total is None else _add(total, part)
            total.shift = common
        states = {
            "gram": total.gram, "feature_sum": total.feature_sum, "cross": total.cross,
            "target_sum": total.target_sum, "target_sq": total.target_sq,
            "num_samples": torch.tensor(float(total.num_samples)), "shift": total.shift,
        }
        return self._scorer._compute(states, reduction=self.reduction)


def _add(a: SufficientStatistics, b: SufficientStatistics) -> SufficientStatistics:
    """The sums of two parts about the same shift."""
    return SufficientStatistics(
        a.gram + b.gram, a.feature_sum + b.feature_sum, a.cross + b.cross, a.target_sum + b.target_sum,
        a.target_sq + b.target_sq, a.num_samples + b.num_samples, a.shift,
    )
