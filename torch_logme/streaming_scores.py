"""Streaming accumulators of the other scores, on the LogME accumulator's base class.

NCE, H-score, the shrinkage H-score, TransRate and GBC depend on the data
only through sums over samples (see ``torch_logme.scores``), so each has an
accumulator with the same ``update`` / ``compute`` / ``reset`` / ``merge`` /
``state_dict`` / ``sync`` design as :class:`torch_logme.LogMEAccumulator`:
the states are those sums, summed (never averaged) across batches,
accumulators and processes. ``update`` is the score's update stage and
``compute()`` its compute stage (``<score>_compute`` in
``torch_logme.scores``), the ones the functional form runs once.

LEEP has no accumulator: its score is (1/N) sum_i log(theta_i . P(y_i | .)),
and P(y | z) is the joint of *all* samples, so every sample's term depends
on data not seen yet. The log of a sum has no finite set of sufficient
statistics; LEEP needs either all the probabilities [N, Cs] at once or two
passes over the data (one for the joint, one for the log terms).

Precision: the feature accumulators sum x = (features - shift) * scale,
as the functional scores do (see ``torch_logme.scores``): the shift [D] is
the first batch's mean, so features far from 0 compared with their spread
keep their digits, and the scale [D] is a power of two taken from the first
batch's magnitude (1 for features of moderate size), so that features of
any magnitude neither overflow nor underflow the sums. Accumulators (or
ranks) with different shifts and scales are brought to one before their
sums are added; both changes are exact algebra on the sums.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_tensor, prepare, prepare_label_pair
from ._checks import source_labels as source_labels_of
from ._options import compute_options
from ._primitives import add_counts_, add_rows_, gram_full
from ._validators import boolean, positive_float, positive_int
from .scores import (
    SCALE_LIMIT,
    ClassMoments,
    _rcond,
    class_gram_blocks,
    framed,
    gbc_compute,
    h_score_compute,
    log2_of,
    magnitude,
    nce_from_counts,
    pow2_scale,
    regularized_h_score_compute,
    scale_band,
    transrate_compute,
    work_dtype,
)
from .streaming import SumAccumulator, _check_labels_on_host, _state_device

__all__ = [
    "NCEAccumulator",
    "HScoreAccumulator",
    "RegularizedHScoreAccumulator",
    "TransRateAccumulator",
    "GBCAccumulator",
]

Device = Union[str, torch.device, None]


class _NamedSums(SumAccumulator):
    """The other scores' accumulators: settings are the sizes, the dtype and ``check_inputs``.

    Subclasses list their states in ``_AXES`` (see ``SumAccumulator``).
    """

    def __init__(
        self,
        sizes: Dict[str, Optional[int]],
        *,
        dtype: torch.dtype,
        device: Device,
        sync_on_compute: bool,
        check_inputs: bool,
    ) -> None:
        options = compute_options(dtype=dtype, device=device)
        self.check_inputs = boolean(check_inputs, "check_inputs")
        super().__init__(sizes, options, sync_on_compute=sync_on_compute)

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    def _config(self) -> Dict[str, Any]:
        return {"fixed": self._fixed, "dtype": str(self.dtype)}

    # Narrower than the base's **kwargs on purpose: these scores take no compute options.
    def compute(self) -> Tensor:  # type: ignore[override]
        """The score of every batch so far (0-dim; summed over ranks when distributed)."""
        return super().compute()


class NCEAccumulator(_NamedSums):
    """Streaming NCE: counts of (source label, target label) pairs [Cs, Ct].

    ``update(source_labels, target_labels)`` per batch of hard labels [B];
    ``compute()`` equals :func:`torch_logme.nce` on all batches.

    Args:
        num_source_classes: Cs; None grows it on update (reading the batch's
            largest labels to the host).
        num_target_classes: Ct; None grows it likewise.
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
            "num_source_classes": positive_int(num_source_classes, "num_source_classes", optional=True),
            "num_target_classes": positive_int(num_target_classes, "num_target_classes", optional=True),
        }
        super().__init__(sizes, dtype=dtype, device=device, sync_on_compute=sync_on_compute,
                         check_inputs=check_inputs)

    def check_batch(
        self, source_labels: Any, target_labels: Any, device: Optional[torch.device] = None
    ) -> Tuple[Tensor, Tensor, Optional[int], Optional[int]]:
        """Run every check ``update`` runs on a batch, adding nothing.

        Returns (source labels [B], target labels [B] on ``device``, and the
        numbers of source and target classes the batch implies, or None
        where they were not read).
        """
        probe = source_labels_of(source_labels, check=self.check_inputs)
        fixed = all(v is not None for v in self._fixed.values())
        s, t, cs, ct = prepare_label_pair(
            probe, target_labels, device=device if device is not None else self._device(probe.device), batch=True,
            check_values=self.check_inputs or not fixed,
        )
        if not self.check_inputs and fixed:  # free on the CPU; see _check_labels_on_host
            _check_labels_on_host(s, self._fixed["num_source_classes"], "num_source_classes")
            _check_labels_on_host(t, self._fixed["num_target_classes"], "num_target_classes")
        for name, seen in (("num_source_classes", cs), ("num_target_classes", ct)):
            limit = self._fixed[name]
            if seen is not None and limit is not None and seen > limit:
                raise ValueError(f"class label {seen - 1} is out of range for {name}={limit}")
        return s, t, cs, ct

    def update(self, source_labels: Any, target_labels: Any) -> None:
        """Add a batch of hard source labels [B] (or source-class probabilities or logits
        [B, Cs], whose argmax they are) and target labels [B]."""
        device = self._device(as_tensor(source_labels, "source_labels").device)
        s, t, cs, ct = self.check_batch(source_labels, target_labels, device)
        self._ensure_allocated(device)
        for name, seen in (("num_source_classes", cs), ("num_target_classes", ct)):
            self._grow_to(name, seen)
        counts = self._states["counts"]
        with torch.no_grad():
            flat = counts.view(-1)
            add_counts_(flat, s * counts.shape[1] + t)

    def _compute(self, states: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        counts = states["counts"]
        n = int(counts.sum().item())
        if n < 2:
            raise ValueError(f"NCE needs at least 2 samples, got N = {n}; call update() first")
        with torch.no_grad():
            return nce_from_counts(counts)


class _FeatureSums(_NamedSums):
    """Features [B, D] and class labels [B] into per-class sums (a ClassMoments) in a frame.

    The sums are of x = (features - shift) * scale. The shift [D] (float64)
    is the first batch's mean (``SumAccumulator._take_shift``); the scale
    [D] (float64 powers of two) comes from the first batch's magnitude:
    one per column (``_PER_COLUMN``) or one for all, 1 inside the band of
    magnitudes whose sums of ``_POWER``-th powers need none. Subclasses
    give ``_recentre`` (the sums of x + delta) and ``_rescale`` (the sums
    of x * factor); merge and sync bring every accumulator to the coarsest
    scale and to one shift with them.
    """

    _SHIFTED = True
    _MOMENTS: Dict[str, bool] = {}
    _POWER = 2
    _PER_COLUMN = False
    #: Whether the score must resolve every column however small (no absolute constant floors it).
    _SCALE_INVARIANT = False

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
        self._scale: Optional[Tensor] = None
        # The common scale of the ranks while sync / compute reduce the sums.
        self._target_scale: Optional[Tensor] = None
        # Whether the scale may leave float32's range (it came from wider
        # features), so that batches must be shifted in float64.
        self._wide = False
        sizes = {
            "num_features": positive_int(num_features, "num_features"),
            "num_classes": positive_int(num_classes, "num_classes", optional=True),
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

    @property
    def scale(self) -> Optional[Tensor]:
        """[D] the powers of two the shifted batches are multiplied by (None before the first batch)."""
        return self._scale

    def check_batch(self, features: Any, labels: Any, device: Optional[torch.device] = None) -> Inputs:
        """Run every check ``update`` runs on a batch (features [B, D], class ids [B]), adding nothing."""
        f = as_tensor(features, "features")
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(
                f"features must be [B, {self.num_features}] (batch x num_features), got shape {tuple(f.shape)}"
            )
        inputs = prepare(
            f, labels, regression=False, num_classes=self._fixed["num_classes"],
            device=device if device is not None else self._device(f.device), batch=True,
            check_values=self.check_inputs,
        )
        if not self.check_inputs:  # free on the CPU; see _check_labels_on_host
            _check_labels_on_host(inputs.targets, self._fixed["num_classes"], "num_classes")
        return inputs

    def update(self, features: Any, labels: Any) -> None:
        """Add a batch: features [B, D] (any float dtype), class ids [B]."""
        device = self._device(as_tensor(features, "features").device)
        inputs = self.check_batch(features, labels, device)
        self._ensure_allocated(device)
        self._grow_to("num_classes", inputs.num_columns)
        with torch.no_grad():
            shift = self._take_shift(inputs.features, torch.float64, device)
            scale = self._take_scale(inputs.features, device)
            # The batch is shifted in float64 unless it and the sums are float32 (and the scale fits).
            work = torch.float64 if self._wide else work_dtype(inputs.features.dtype, self.dtype)
            self._add(inputs.features, inputs.targets, shift.to(work), scale.to(work))

    @torch.inference_mode(False)
    def _take_scale(self, features: Tensor, device: torch.device) -> Tensor:
        """The scale, set from this batch's magnitude when there is none yet (no host read)."""
        if self._scale is None:
            work = work_dtype(features.dtype, self.dtype)
            size = magnitude(features)
            if not self._PER_COLUMN:
                size = size.amax().expand(size.shape[0])
            self._scale = pow2_scale(size, scale_band(self.dtype, self._POWER), SCALE_LIMIT[work]).to(device)
            self._wide = work == torch.float64
        return self._scale

    def _own_scale(self) -> Tensor:
        """The scale of the local sums: 1 where none was set (sums of the features themselves)."""
        if self._scale is not None:
            return self._scale
        return torch.ones(self.num_features, dtype=torch.float64, device=self._device(torch.device("cpu")))

    def _moments(self, states: Mapping[str, Tensor]) -> ClassMoments:
        return ClassMoments(
            states["counts"], states["sums"], None, states.get("gram"), states.get("squares"),
            states.get("norm_sq_sums"), states.get("norm_quartic"),
        )

    def _add(self, features: Tensor, labels: Tensor, shift: Tensor, scale: Tensor) -> None:
        moments = self._moments(self._states)
        moments.shift, moments.scale = shift, scale
        moments.add_(features, labels)

    # -- frames: recentring and rescaling the sums ---------------------------------
    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        """New states: the sums of x + delta [D] (in the states' dtype and scaled units)."""
        raise NotImplementedError

    def _rescale(self, states: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
        """New states: the sums of x * factor [D] (powers of two, so exact)."""
        raise NotImplementedError

    def _shift_dtype(self) -> torch.dtype:
        """Shifts are float64 whatever the sums' dtype (see ``work_dtype``)."""
        return torch.float64

    def _states_at(self, shift: Optional[Tensor]) -> "OrderedDict[str, Tensor]":
        """The local states about ``shift``, at the ranks' common scale while syncing.

        Overrides the base class's, which knows the shift only: the sums are
        first brought to ``_target_scale`` (set by ``_common_shift``), then
        moved by delta = (own shift - shift) * scale, in scaled units.
        """
        states: "OrderedDict[str, Tensor]" = self._states
        if self._shift is None:  # nothing summed: zeros in any frame
            return states
        scale = self._own_scale()
        if self._target_scale is not None:
            target = self._target_scale.to(scale.device)
            if not torch.equal(target, scale):
                states = OrderedDict(self._rescale(states, (target / scale).to(self.dtype)))
                scale = target
        if shift is None:
            return states
        shift = shift.to(self._shift.device, torch.float64)
        if torch.equal(self._shift, shift):
            return states
        delta = ((self._shift - shift) * scale).to(self.dtype)
        moved = self._recentre(states, delta)
        return OrderedDict((name, moved[name]) for name in states)

    def _common_shift(self, group: Any, device: torch.device) -> Optional[Tensor]:
        """The mean of the ranks' shifts, in float64; also sets the common scale, their minimum.

        Extends the base class's with the common scale. Two all_reduce
        calls; ranks without a batch do not count.
        """
        dist = torch.distributed
        d = self.num_features
        packed = torch.zeros(d + 1, dtype=torch.float64, device=device)
        if self._shift is not None:
            packed[:d] = self._shift.to(device, torch.float64)
            packed[d] = 1
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        scale = torch.full((d,), float("inf"), dtype=torch.float64, device=device)
        if self._shift is not None:
            scale.copy_(self._own_scale())
        dist.all_reduce(scale, op=dist.ReduceOp.MIN, group=group)
        count = float(packed[d].item())
        if count == 0:
            self._target_scale = None
            return None
        self._target_scale = scale
        return packed[:d] / count

    def _merge(self, other: "SumAccumulator") -> "SumAccumulator":
        """Add another accumulator's sums into this one (same type and settings), at the coarser scale."""
        if type(other) is not type(self) or other._config() != self._config() or other._shift is None:
            return super()._merge(other)  # a mismatch raises; an accumulator without batches adds zeros
        assert isinstance(other, _FeatureSums)
        other._ensure_allocated()
        self._ensure_allocated(_state_device(other._states))  # made where their sums are, as in the base
        device = next(iter(self._states.values())).device
        theirs = other._own_scale().to(device)
        if self._shift is None:  # nothing summed here: take their scale (the base class takes their shift)
            self._scale = theirs.clone()
            self._wide = other._wide
            return super()._merge(other)
        mine = self._own_scale()
        target = torch.minimum(mine, theirs)
        if not torch.equal(target, mine):
            for name, value in self._rescale(self._states, (target / mine).to(self.dtype)).items():
                self._states[name].copy_(value)
            self._scale = target
        self._wide = self._wide or other._wide
        if not torch.equal(target, theirs):  # a copy of theirs at this scale; theirs stays as it is
            other_device = next(iter(other._states.values())).device
            factor = (target / theirs).to(other_device, other.dtype)
            proxy = copy.copy(other)
            proxy._states = OrderedDict(other._rescale(other._states, factor))
            proxy._scale = target.to(other_device)
            other = proxy
        return super()._merge(other)

    def sync(self, group: Any = None) -> "SumAccumulator":
        """Replace the local sums with their sum over ``group``, at the ranks' common shift and scale."""
        with self._lock:
            try:
                super().sync(group)
                if self._target_scale is not None:
                    self._scale = self._target_scale
                    self._wide = self._wide or bool((log2_of(self._scale).abs() > SCALE_LIMIT[torch.float32]).any())
            finally:
                self._target_scale = None
            return self

    def compute(self) -> Tensor:  # type: ignore[override]
        """The score of every batch so far (0-dim; summed over ranks when distributed)."""
        with self._lock:
            try:
                return super().compute()
            finally:
                self._target_scale = None

    def reset(self) -> None:
        """Zero every sum, keeping sizes, device and dtype; the next batch sets a new shift and scale."""
        with self._lock:
            super().reset()
            self._scale = None
            self._wide = False

    def state_dict(self) -> Dict[str, Any]:
        """Copies of the sums, shift and scale plus the settings, for checkpoints."""
        out = super().state_dict()
        out["scale"] = None if self._scale is None else self._scale.detach().clone()
        out["wide"] = self._wide
        return out

    def _frame(self) -> Dict[str, Any]:
        """The base class's frame plus "scale" [D] (zeros before the first batch) and "wide" (a bool)."""
        out = super()._frame()
        out["scale"] = self._scale if self._scale is not None else torch.zeros_like(out["shift"])
        out["wide"] = self._wide
        return out

    def _bind(self, states: Mapping[str, Tensor], frame: Optional[Mapping[str, Any]]) -> "SumAccumulator":
        super()._bind(states, frame)
        self._scale = frame["scale"] if frame is not None and self._shift is not None else None
        self._wide = frame is not None and bool(frame["wide"])
        self._target_scale = None
        return self

    def _common_frame(self, frames: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
        """The base class's common shift, with the coarsest of the scales set (as ``_common_shift``)."""
        out = super()._common_frame(frames)
        if out is None:
            return None
        framed = [f for f in frames if bool(f["has_shift"])]
        scale = torch.stack([f["scale"].to(torch.float64) for f in framed]).amin(0)
        wide = any(bool(f["wide"]) for f in framed)
        out.update(scale=scale, wide=wide or bool((log2_of(scale).abs() > SCALE_LIMIT[torch.float32]).any()))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore sums saved by ``state_dict`` (settings must match); atomic, as the base class's."""
        with self._lock:
            # The scale is checked before the base class loads anything: a bad one must change nothing.
            saved = state.get("scale") if isinstance(state, Mapping) else None
            if saved is not None:
                saved = torch.as_tensor(saved)
                if tuple(saved.shape) != (self.num_features,) or not saved.is_floating_point():
                    raise ValueError(
                        f"state_dict 'scale' is {tuple(saved.shape)} {saved.dtype}, expected ({self.num_features},) "
                        "floating point"
                    )
            super().load_state_dict(state)
            device = next(iter(self._states.values())).device
            self._scale = None if saved is None else saved.to(device, torch.float64).clone()
            self._wide = bool(state.get("wide", True))
            if self._shift is not None and self._scale is None:
                self._scale = torch.ones(self.num_features, dtype=torch.float64, device=device)
                self._wide = True

    # -- the score -----------------------------------------------------------------
    def _compute(self, states: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        n = int(states["counts"].sum().item())
        if n < 2:
            raise ValueError(f"{self._NAME} needs at least 2 samples, got N = {n}; call update() first")
        sums = [v for k, v in states.items() if k != "shift"]
        if not all(bool(torch.isfinite(v).all()) for v in sums):
            raise ValueError(
                f"{self._NAME}: the accumulated sums overflowed {self.dtype}: a batch was far larger than the "
                "first one, which set the accumulator's scale; divide the features by a constant, or feed a "
                "batch of typical magnitude first"
            )
        shift = states.get("shift")
        if not bool(self._second_moments(states).gt(0).any()) and (shift is None or not bool(shift.ne(0).any())):
            raise ValueError("features are all zero (rank 0); expected features with at least one non-zero value")
        scale = self._target_scale if self._target_scale is not None else self._scale
        if scale is not None and self._SCALE_INVARIANT and self.dtype == torch.float32:
            if bool((log2_of(scale) >= SCALE_LIMIT[torch.float64]).any()):  # scaled as far as float64 goes
                raise ValueError(
                    f"{self._NAME}: features below 2**-{SCALE_LIMIT[torch.float64]} (subnormal float64) are too "
                    "small to sum in float32, even scaled; multiply them by a constant or use dtype=torch.float64"
                )
        if scale is not None and bool((scale == 1).all()):
            scale = None
        with torch.no_grad():
            score = self._score(states, scale)
        if not bool(torch.isfinite(score)):
            raise ValueError(
                f"{self._NAME} came out {float(score)}: the features' sums exceed the range of {self.dtype}; "
                "divide the features by a constant (or use float64)"
            )
        return score

    _NAME = ""

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _score(self, states: Mapping[str, Tensor], scale: Optional[Tensor]) -> Tensor:
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
    __doc__ = """Streaming H-score: keeps X^T X [D, D], class sums [C, D] and counts [C].

    X are the features minus the first batch's mean, scaled per column by
    a power of two when their magnitude needs it. ``compute()`` equals
    :func:`torch_logme.h_score` on all batches (the primal, D x D form),
    whatever the features' offset and magnitude. ``rcond`` as there.
    """ + _ARGS_DOC

    _AXES = {"counts": ("num_classes",), "sums": ("num_classes", "num_features"),
             "gram": ("num_features", "num_features")}
    _NAME = "H-score"
    _PER_COLUMN = True  # the score standardises every column
    _SCALE_INVARIANT = True

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

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        # sum (x + d)(x + d)^T = G + s d^T + d s^T + N d d^T (the upper triangle stays exact);
        # class sums gain n_c d.
        counts, sums = states["counts"], states["sums"]
        cross = torch.outer(sums.sum(0), delta)
        gram = states["gram"] + cross + cross.T + counts.sum() * torch.outer(delta, delta)
        return dict(states, gram=gram, sums=sums + counts[:, None] * delta)

    def _rescale(self, states: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
        return dict(states, gram=states["gram"] * torch.outer(factor, factor), sums=states["sums"] * factor)

    def _score(self, states: Mapping[str, Tensor], scale: Optional[Tensor]) -> Tensor:
        return h_score_compute(self._moments(states), self.rcond)


class RegularizedHScoreAccumulator(HScoreAccumulator):
    __doc__ = """Streaming shrinkage H-score: the H-score sums plus sum ||x||^2 x [D] and sum ||x||^4.

    The Ledoit-Wolf shrinkage needs sum_k ||x_k x_k^T - S||_F^2, which
    expands to sum_k ||x_k - mu||^4 - N ||S||_F^2: a fourth moment, but only
    its trace, which the two extra sums give. One power of two scales all
    columns, sized for fourth powers. ``compute()`` equals
    :func:`torch_logme.regularized_h_score` on all batches.
    """ + _ARGS_DOC

    _AXES = dict(HScoreAccumulator._AXES, norm_sq_sums=("num_features",), norm_quartic=())
    _NAME = "regularized H-score"
    _PER_COLUMN = False  # the shrinkage target mu I is not invariant to scaling one column
    _POWER = 4

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        # With y = x + d, ||y||^2 = q + 2 p + dd (q = ||x||^2, p = x.d, dd = ||d||^2), so
        #   sum ||y||^2 y = sum q x + 2 G d + dd s + d (tr G + 2 s.d + N dd)
        #   sum ||y||^4   = sum q^2 + 4 d^T G d + N dd^2 + 4 (sum q x).d + 2 dd tr G + 4 dd s.d
        # with G = sum x x^T and s = sum x.
        out = super()._recentre(states, delta)
        gram = gram_full(states["gram"])
        total, n = states["sums"].sum(0), states["counts"].sum()
        norm_sq_sums, quartic = states["norm_sq_sums"], states["norm_quartic"]
        g_d, s_d, d_d, trace = gram @ delta, total @ delta, delta @ delta, gram.trace()
        out["norm_sq_sums"] = norm_sq_sums + 2 * g_d + d_d * total + delta * (trace + 2 * s_d + n * d_d)
        out["norm_quartic"] = (
            quartic + 4 * (delta @ g_d) + n * d_d * d_d + 4 * (norm_sq_sums @ delta) + 2 * d_d * trace + 4 * d_d * s_d
        )
        return out

    def _rescale(self, states: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
        out = super()._rescale(states, factor)
        one = factor[0]  # the same for every column
        out["norm_sq_sums"] = states["norm_sq_sums"] * (factor * one * one)
        out["norm_quartic"] = states["norm_quartic"] * (one * one * one * one)
        return out

    def _score(self, states: Mapping[str, Tensor], scale: Optional[Tensor]) -> Tensor:
        return regularized_h_score_compute(self._moments(states), self.rcond)


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
    _PER_COLUMN = False  # log det(I + Z^T Z / (n eps)) is not invariant to scaling one column

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
        self.eps = positive_float(eps, "eps")

    def _add(self, features: Tensor, labels: Tensor, shift: Tensor, scale: Tensor) -> None:
        states = self._states
        batch_counts = add_counts_(torch.zeros_like(states["counts"]), labels)
        states["counts"].add_(batch_counts)
        add_rows_(states["sums"], labels, framed(features, self.dtype, shift, scale))
        sizes = [int(v) for v in batch_counts.tolist()]
        for ids, grams in class_gram_blocks(features, labels, sizes, shift, self.dtype, dual=False, scale=scale):
            add_rows_(states["class_grams"], ids, grams)

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        return states["class_grams"].diagonal(dim1=1, dim2=2)

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        # Per class: G_c + s_c d^T + d s_c^T + n_c d d^T, as batched rank-one updates of one copy.
        counts, sums = states["counts"], states["sums"]
        c, d = sums.shape
        row = delta.expand(c, 1, d)
        grams = states["class_grams"].clone()
        grams.baddbmm_(sums[:, :, None], row)
        grams.baddbmm_(row.transpose(1, 2), sums[:, None, :])
        grams.baddbmm_((counts[:, None] * delta)[:, :, None], row)
        return dict(states, class_grams=grams, sums=sums + counts[:, None] * delta)

    def _rescale(self, states: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
        grams = states["class_grams"] * torch.outer(factor, factor)
        return dict(states, class_grams=grams, sums=states["sums"] * factor)

    def _score(self, states: Mapping[str, Tensor], scale: Optional[Tensor]) -> Tensor:
        moments = ClassMoments(states["counts"], states["sums"], scale=scale, class_grams=states["class_grams"])
        return transrate_compute(moments, self.eps)


class GBCAccumulator(_FeatureSums):
    __doc__ = """Streaming GBC: per-class sums [C, D], sums of squares [C, D] and counts [C].

    ``compute()`` equals :func:`torch_logme.gbc` on all batches;
    ``min_variance`` as there.
    """ + _ARGS_DOC

    _AXES = {"counts": ("num_classes",), "sums": ("num_classes", "num_features"),
             "squares": ("num_classes", "num_features")}
    _NAME = "GBC"
    _PER_COLUMN = True  # diagonal covariances: the floor is scaled with each column

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
        self.min_variance = positive_float(min_variance, "min_variance")

    def _second_moments(self, states: Mapping[str, Tensor]) -> Tensor:
        return states["squares"]

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        # Per class: sum (x + d)^2 = squares_c + 2 d s_c + n_c d^2; sums gain n_c d.
        counts, sums = states["counts"][:, None], states["sums"]
        squares = states["squares"] + 2 * delta * sums + counts * (delta * delta)
        return dict(states, squares=squares, sums=sums + counts * delta)

    def _rescale(self, states: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
        return dict(states, squares=states["squares"] * (factor * factor), sums=states["sums"] * factor)

    def _score(self, states: Mapping[str, Tensor], scale: Optional[Tensor]) -> Tensor:
        moments = self._moments(states)
        moments.scale = None if scale is None else scale.to(states["sums"].device)
        return gbc_compute(moments, self.min_variance)
