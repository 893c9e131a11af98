"""Streaming accumulators of the other scores, on the LogME accumulator's base class.

NCE, H-score, the shrinkage H-score, TransRate and GBC depend on the data
only through sums over samples (see ``torch_logme.scores``), so each has an
accumulator with the same ``update`` / ``compute`` / ``reset`` / ``merge`` /
``state_dict`` / ``sync`` design as :class:`torch_logme.LogMEAccumulator`:
the states are those sums, summed (never averaged) across batches,
accumulators and processes. ``compute()`` runs the same code as the
functional score on them.

LEEP has no accumulator: its score is (1/N) sum_i log(theta_i . P(y_i | .)),
and P(y | z) is the joint of *all* samples, so every sample's term depends
on data not seen yet. The log of a sum has no finite set of sufficient
statistics; LEEP needs either all the probabilities [N, Cs] at once or two
passes over the data (one for the joint, one for the log terms).

Precision: the streaming sums are of the raw features (the functional
scores subtract the mean first). When the features sit far from 0 compared
with their spread, the covariances formed from the sums lose digits to
cancellation; every score here is shift-invariant, so subtracting any fixed
vector close to the mean from every batch before ``update`` avoids it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import as_tensor, prepare, prepare_label_pair
from ._options import make_options
from .scores import (
    ClassMoments,
    _positive,
    _rcond,
    class_gram_blocks,
    gbc_from_moments,
    h_score_from_moments,
    nce_from_counts,
    regularized_h_score_from_moments,
    transrate_from_class_grams,
)
from .streaming import SumAccumulator, _default_device
from .statistics import add_rows_

__all__ = [
    "NCEAccumulator",
    "HScoreAccumulator",
    "RegularizedHScoreAccumulator",
    "TransRateAccumulator",
    "GBCAccumulator",
]

Device = Union[str, torch.device, None]


def _positive_int(value: Any, name: str, optional: bool = True) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _NamedSums(SumAccumulator):
    """Sum-states whose shapes are named sizes; a size left unset grows on update.

    Subclasses list their states in ``_AXES`` as name -> tuple of size names.
    """

    _AXES: Dict[str, Tuple[str, ...]] = {}

    def __init__(
        self,
        sizes: Dict[str, Optional[int]],
        *,
        dtype: torch.dtype,
        device: Device,
        sync_on_compute: bool,
        check_inputs: bool,
    ) -> None:
        super().__init__(sync_on_compute=sync_on_compute)
        self.options = make_options(dtype=dtype, device=device)
        if not isinstance(check_inputs, bool):
            raise TypeError(f"check_inputs must be a bool, got {type(check_inputs).__name__}")
        self.check_inputs = check_inputs
        self._fixed = dict(sizes)
        self._dims = {name: (value or 0) for name, value in sizes.items()}
        self._allocated = False
        if self.options.device is not None:
            self._allocate(self.options.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    # States are made outside inference mode even when the first update runs inside it
    # (Lightning validates under inference_mode): inference tensors could not be reset
    # or added to in place afterwards.
    @torch.inference_mode(False)
    def _allocate(self, device: torch.device) -> None:
        self._states = OrderedDict(
            (name, torch.zeros(tuple(self._dims[a] for a in axes), dtype=self.dtype, device=device))
            for name, axes in self._AXES.items()
        )
        self._allocated = True

    def _ensure_allocated(self, device: Optional[torch.device] = None) -> None:
        if not self._allocated:
            self._allocate(_default_device(device))

    def _device(self, fallback: torch.device) -> torch.device:
        """Where the states are, or will be once the first batch passes its checks."""
        if not self._allocated:
            return self.options.device or fallback
        return next(iter(self._states.values())).device

    def _ensure_allocated_on(self, device: torch.device) -> None:
        if not self._allocated:
            self._allocate(device)

    def _sizes(self) -> Dict[str, Tuple[int, bool]]:
        return {name: (self._dims[name], self._fixed[name] is None) for name in self._dims}

    @torch.inference_mode(False)
    def _grow(self, name: str, size: int) -> None:
        if not self._allocated:
            self._dims[name] = size
            self._allocate(torch.device("cpu"))
            return
        for state, axes in self._AXES.items():
            value = self._states[state]
            for axis, axis_name in enumerate(axes):
                if axis_name == name and value.shape[axis] < size:
                    shape = list(value.shape)
                    shape[axis] = size - value.shape[axis]
                    value = torch.cat([value, value.new_zeros(shape)], dim=axis)
            self._states[state] = value
        self._dims[name] = size

    def _grow_to(self, name: str, size: Optional[int]) -> None:
        if size is not None and size > self._dims[name]:
            self._grow(name, size)

    def _config(self) -> Dict[str, Any]:
        return {"fixed": self._fixed, "dtype": str(self.dtype)}

    def compute(self) -> Tensor:  # type: ignore[override]
        """The score of every batch so far (0-dim; summed over ranks when distributed)."""
        self._ensure_allocated()
        return super().compute()


class NCEAccumulator(_NamedSums):
    """Streaming NCE: counts of (source label, target label) pairs [Cs, Ct].

    ``update(source_labels, target_labels)`` per batch of hard labels [B];
    ``compute()`` equals :func:`torch_logme.nce` on all batches.

    Args:
        num_source_classes, num_target_classes: Cs and Ct; None grows them
            on update (reading the batch's largest labels to the host).
        dtype: precision of the counts and of compute (default float64).
        device: where the counts live; None: the device of the first batch.
        sync_on_compute: sum the counts across ranks in ``compute()`` when a
            torch.distributed group is initialised.
        check_inputs: check each batch's label values (one host read per
            update); False, with both sizes given, keeps updates sync-free.
    """

    _AXES = {"counts": ("num_source_classes", "num_target_classes")}

    def __init__(
        self,
        num_source_classes: Optional[int] = None,
        num_target_classes: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: Device = None,
        sync_on_compute: bool = True,
        check_inputs: bool = True,
    ) -> None:
        sizes = {
            "num_source_classes": _positive_int(num_source_classes, "num_source_classes"),
            "num_target_classes": _positive_int(num_target_classes, "num_target_classes"),
        }
        super().__init__(sizes, dtype=dtype, device=device, sync_on_compute=sync_on_compute,
                         check_inputs=check_inputs)

    def update(self, source_labels: Any, target_labels: Any) -> None:
        """Add a batch of hard source labels [B] and target labels [B]."""
        probe = as_tensor(source_labels, "source_labels")
        device = self._device(probe.device)
        fixed = all(v is not None for v in self._fixed.values())
        s, t, cs, ct = prepare_label_pair(
            probe, target_labels, device=device, batch=True, check_values=self.check_inputs or not fixed
        )
        self._ensure_allocated_on(device)
        for name, seen in (("num_source_classes", cs), ("num_target_classes", ct)):
            if seen is not None and self._fixed[name] is not None and seen > self._fixed[name]:
                raise ValueError(f"class label {seen - 1} is out of range for {name}={self._fixed[name]}")
            self._grow_to(name, seen)
        counts = self._states["counts"]
        with torch.no_grad():
            flat = counts.view(-1)
            flat.index_add_(0, s * counts.shape[1] + t, torch.ones_like(s, dtype=counts.dtype))

    def _compute(self, states: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        counts = states["counts"]
        n = int(counts.sum().item())
        if n < 2:
            raise ValueError(f"NCE needs at least 2 samples, got N = {n}; call update() first")
        with torch.no_grad():
            return nce_from_counts(counts)


class _FeatureSums(_NamedSums):
    """Features [B, D] and class labels [B] into per-class sums (a ClassMoments)."""

    _MOMENTS: Dict[str, bool] = {}

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int],
        *,
        dtype: torch.dtype,
        device: Device,
        sync_on_compute: bool,
        check_inputs: bool,
    ) -> None:
        sizes = {
            "num_features": _positive_int(num_features, "num_features", optional=False),
            "num_classes": _positive_int(num_classes, "num_classes"),
        }
        super().__init__(sizes, dtype=dtype, device=device, sync_on_compute=sync_on_compute,
                         check_inputs=check_inputs)

    @property
    def num_features(self) -> int:
        return self._dims["num_features"]

    @property
    def num_classes(self) -> int:
        """C: classes seen so far (or fixed)."""
        return self._dims["num_classes"]

    def update(self, features: Any, labels: Any) -> None:
        """Add a batch: features [B, D] (any float dtype), class ids [B]."""
        f = as_tensor(features, "features")
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(
                f"features must be [B, {self.num_features}] (batch x num_features), got shape {tuple(f.shape)}"
            )
        device = self._device(f.device)
        inputs = prepare(
            f, labels, regression=False, num_classes=self._fixed["num_classes"], device=device,
            batch=True, check_values=self.check_inputs,
        )
        self._ensure_allocated_on(device)
        self._grow_to("num_classes", inputs.num_columns)
        with torch.no_grad():
            self._add(inputs.features, inputs.targets)

    def _moments(self, states: Mapping[str, Tensor]) -> ClassMoments:
        return ClassMoments(
            states["counts"], states["sums"], None, states.get("gram"), states.get("squares"),
            states.get("norm_sq_sums"), states.get("norm_quartic"),
        )

    def _add(self, features: Tensor, labels: Tensor) -> None:
        self._moments(self._states).add_(features, labels)

    def _compute(self, states: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        n = int(states["counts"].sum().item())
        if n < 2:
            raise ValueError(f"{self._NAME} needs at least 2 samples, got N = {n}; call update() first")
        if not bool(self._second_moments(states).gt(0).any()):
            raise ValueError("features are all zero (rank 0); expected features with at least one non-zero value")
        with torch.no_grad():
            return self._score(states)

    _NAME = ""

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _score(self, states: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError


_ARGS_DOC = """
    Args:
        num_features: D.
        num_classes: C; None grows the class dimension on update, reading
            the batch's largest label to the host (a sync per update).
        dtype: precision of the sums and of compute (default float64).
        device: where the sums live; None: the device of the first batch.
        sync_on_compute: sum the states across ranks in ``compute()`` when a
            torch.distributed group is initialised.
        check_inputs: check each batch for NaN/Inf and bad labels (one host
            read per update); False, with ``num_classes`` given, skips it.
"""


class HScoreAccumulator(_FeatureSums):
    __doc__ = """Streaming H-score: keeps F^T F [D, D], class sums [C, D] and counts [C].

    ``compute()`` equals :func:`torch_logme.h_score` on all batches (the
    primal, D x D form). ``rcond`` as there.
    """ + _ARGS_DOC

    _AXES = {"counts": ("num_classes",), "sums": ("num_classes", "num_features"),
             "gram": ("num_features", "num_features")}
    _NAME = "H-score"

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int] = None,
        *,
        rcond: Optional[float] = None,
        dtype: torch.dtype = torch.float64,
        device: Device = None,
        sync_on_compute: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(num_features, num_classes, dtype=dtype, device=device,
                         sync_on_compute=sync_on_compute, check_inputs=check_inputs)
        self.rcond = _rcond(rcond, self.dtype)

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        return states["gram"].diagonal()

    def _score(self, states: Mapping[str, Tensor]) -> Tensor:
        return h_score_from_moments(self._moments(states), self.rcond)


class RegularizedHScoreAccumulator(HScoreAccumulator):
    __doc__ = """Streaming shrinkage H-score: the H-score sums plus sum ||x||^2 x [D] and sum ||x||^4.

    The Ledoit-Wolf shrinkage needs sum_k ||x_k x_k^T - S||_F^2, which
    expands to sum_k ||x_k - mu||^4 - N ||S||_F^2: a fourth moment, but only
    its trace, which the two extra sums give. ``compute()`` equals
    :func:`torch_logme.regularized_h_score` on all batches.
    """ + _ARGS_DOC

    _AXES = dict(HScoreAccumulator._AXES, norm_sq_sums=("num_features",), norm_quartic=())
    _NAME = "regularized H-score"

    def _score(self, states: Mapping[str, Tensor]) -> Tensor:
        return regularized_h_score_from_moments(self._moments(states), self.rcond)


class TransRateAccumulator(_FeatureSums):
    __doc__ = """Streaming TransRate: per-class F_c^T F_c [C, D, D], class sums [C, D] and counts [C].

    Its state grows as C D^2 (C = 100, D = 768: 470 MB in float64); when
    that is too much, use the functional :func:`torch_logme.transrate`. Each
    update reads the batch's class counts to the host once (it batches the
    per-class products by class size). ``compute()`` equals
    :func:`torch_logme.transrate` on all batches; ``eps`` as there.
    """ + _ARGS_DOC

    _AXES = {"counts": ("num_classes",), "sums": ("num_classes", "num_features"),
             "class_grams": ("num_classes", "num_features", "num_features")}
    _NAME = "TransRate"

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int] = None,
        *,
        eps: float = 1e-4,
        dtype: torch.dtype = torch.float64,
        device: Device = None,
        sync_on_compute: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(num_features, num_classes, dtype=dtype, device=device,
                         sync_on_compute=sync_on_compute, check_inputs=check_inputs)
        self.eps = _positive(eps, "eps")

    def _add(self, features: Tensor, labels: Tensor) -> None:
        states = self._states
        ones = torch.ones_like(labels, dtype=self.dtype)
        batch_counts = torch.zeros_like(states["counts"]).index_add_(0, labels, ones)
        states["counts"].add_(batch_counts)
        add_rows_(states["sums"], labels, features.to(self.dtype))
        sizes = [int(v) for v in batch_counts.tolist()]
        for ids, grams in class_gram_blocks(features, labels, sizes, None, self.dtype, dual=False):
            add_rows_(states["class_grams"], ids, grams)

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        return states["class_grams"].diagonal(dim1=1, dim2=2)

    def _score(self, states: Mapping[str, Tensor]) -> Tensor:
        return transrate_from_class_grams(states["class_grams"], states["sums"], states["counts"], self.eps)


class GBCAccumulator(_FeatureSums):
    __doc__ = """Streaming GBC: per-class sums [C, D], sums of squares [C, D] and counts [C].

    ``compute()`` equals :func:`torch_logme.gbc` on all batches;
    ``min_variance`` as there.
    """ + _ARGS_DOC

    _AXES = {"counts": ("num_classes",), "sums": ("num_classes", "num_features"),
             "squares": ("num_classes", "num_features")}
    _NAME = "GBC"

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int] = None,
        *,
        min_variance: float = 1e-4,
        dtype: torch.dtype = torch.float64,
        device: Device = None,
        sync_on_compute: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(num_features, num_classes, dtype=dtype, device=device,
                         sync_on_compute=sync_on_compute, check_inputs=check_inputs)
        self.min_variance = _positive(min_variance, "min_variance")

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        return states["squares"]

    def _score(self, states: Mapping[str, Tensor]) -> Tensor:
        return gbc_from_moments(states["counts"], states["sums"], states["squares"], self.min_variance)
