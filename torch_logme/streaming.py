"""Streaming scores: accumulate sums over samples batch by batch, score later.

LogME depends on the data only through sums over samples (docs/design.md), so an
accumulator can take batches as they stream by, keep O(D^2 + D C) numbers
and never the features, merge with another accumulator, and sum its state
across processes with one ``all_reduce``. The design follows torchmetrics:
``update`` per batch, ``compute`` per epoch, ``reset`` to start again.

``SumAccumulator`` holds the mechanics (named sum-states, their sizes and
growth, merge, state_dict, sync) for every accumulator; a score subclasses it
with its states' layout (``_AXES``), ``update`` and ``_compute``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_tensor, prepare
from ._options import ComputeOptions, LogMEOptions, logme_options
from ._validators import boolean, one_of, positive_int
from .functional import REDUCTIONS, check_magnitude, reduce_columns, solve_statistics
from .sums import SufficientStatistics

Device = Union[str, torch.device, None]


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _default_device(hint: Optional[torch.device] = None) -> torch.device:
    """Where lazily made states go when no ``device=`` was given.

    ``hint`` (the device of the tensors being loaded or merged in) when
    there is one; else the rank's GPU under NCCL, which reduces GPU tensors
    only; else the CPU.
    """
    if hint is not None:
        return hint
    if _distributed_ready() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SumAccumulator:
    """Named tensors that are sums over samples, with merge / state_dict / sync.

    Subclasses list their states in ``_AXES`` (name -> the names of the
    sizes along its axes) and give the sizes to ``__init__``: a size given
    is fixed and must agree across processes; one left None starts at 0,
    grows on update and is padded to the largest on merge and sync. Every
    state is summed, never averaged, so merging and all-reducing are exact.

    Accumulators of features set ``_SHIFTED = True``: their sums are of
    x = features - shift, with the shift [D] taken from the first batch
    (``_take_shift``), so that features far from 0 compared with their
    spread keep their digits. Two accumulators (or ranks) with different
    shifts are brought to one shift with ``_recentre`` before their sums
    are added; that algebra is exact, it reads no data.

    Args:
        sizes: every size name in ``_AXES`` -> its value, or None to grow it.
        options: ``dtype`` (of the states, unless ``_STATE_DTYPES`` names
            another) and ``device`` (None: made lazily, see
            ``_ensure_allocated``); a score's own options ride along.
        sync_on_compute: ``compute()`` sums the states across ranks first
            when a torch.distributed group is initialised.
    """

    _SHIFTED = False
    #: The states in order, each as the names of the sizes along its axes.
    _AXES: Dict[str, Tuple[str, ...]] = {}
    #: States kept in a dtype of their own instead of ``options.dtype``.
    _STATE_DTYPES: Dict[str, torch.dtype] = {}

    def __init__(
        self, sizes: Mapping[str, Optional[int]], options: Union[ComputeOptions, LogMEOptions], *,
        sync_on_compute: bool = True,
    ) -> None:
        self.sync_on_compute = sync_on_compute
        self.options = options
        self._fixed: Dict[str, Optional[int]] = dict(sizes)
        self._dims: Dict[str, int] = {name: (value or 0) for name, value in sizes.items()}
        self._states: "OrderedDict[str, Tensor]" = OrderedDict()
        self._allocated = False
        self._shift: Optional[Tensor] = None
        if options.device is not None:
            self._allocate(options.device)

    # -- to be provided by subclasses ------------------------------------
    def _config(self) -> Dict[str, Any]:
        """Settings that two accumulators must share to be merged."""
        return {}

    def _compute(self, states: Mapping[str, Tensor], **kwargs: Any) -> Tensor:
        """The score from summed states (plus "shift" [D] or None when ``_SHIFTED``)."""
        raise NotImplementedError

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        """New states that are the sums of x + delta [D], given the sums of x (``_SHIFTED`` only)."""
        raise NotImplementedError

    # -- the shift -------------------------------------------------------------
    @property
    def shift(self) -> Optional[Tensor]:
        """[D] what is subtracted from every batch before it is summed (None before the first batch)."""
        return self._shift

    @torch.inference_mode(False)
    def _take_shift(self, features: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The shift, set from this batch's mean [D] when there is none yet."""
        if self._shift is None:
            self._shift = (features.sum(0, dtype=dtype) / features.shape[0]).to(device)
        return self._shift

    def _shift_dtype(self) -> torch.dtype:
        """The dtype the shift is kept in (by default the states')."""
        return next(iter(self._states.values())).dtype

    def _states_at(self, shift: Optional[Tensor]) -> "OrderedDict[str, Tensor]":
        """The local states about ``shift`` (the current tensors when it is the same)."""
        if not self._SHIFTED or shift is None or self._shift is None or self._shift is shift:
            return self._states
        # The difference in float64, cast once: shifts far from 0 differ in their last digits.
        mine, theirs = self._shift.to(torch.float64), shift.to(self._shift.device, torch.float64)
        if torch.equal(mine, theirs):
            return self._states
        delta = (mine - theirs).to(next(iter(self._states.values())).dtype)
        moved = self._recentre(self._states, delta)
        return OrderedDict((name, moved[name]) for name in self._states)

    def _with_shift(self, states: Mapping[str, Tensor], shift: Optional[Tensor]) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(states)
        if self._SHIFTED:
            out["shift"] = shift
        return out

    # -- the states and their sizes ------------------------------------------
    # States are made outside inference mode even when the first update runs inside it
    # (Lightning validates under inference_mode): inference tensors could not be reset
    # or added to in place afterwards.
    @torch.inference_mode(False)
    def _allocate(self, device: torch.device) -> None:
        """Make every state in ``_AXES``, zero, at the current sizes, on ``device``."""
        self._states = OrderedDict(
            (name, torch.zeros(
                tuple(self._dims[a] for a in axes),
                dtype=self._STATE_DTYPES.get(name, self.options.dtype), device=device,
            ))
            for name, axes in self._AXES.items()
        )
        self._allocated = True

    def _ensure_allocated(self, device: Optional[torch.device] = None) -> None:
        """Create the states if they are made lazily (on the first update).

        Args:
            device: where to make them when there are none yet and no
                ``device=`` was given (the device of the first batch, or of
                the tensors about to be loaded or merged in); None: the
                default device.
        """
        if not self._allocated:
            self._allocate(_default_device(device))

    def _device(self, fallback: torch.device) -> torch.device:
        """Where the states are, or will be once the first batch (on ``fallback``) passes its checks."""
        if not self._allocated:
            return self.options.device or fallback
        return next(iter(self._states.values())).device

    def _growable(self, name: str) -> bool:
        """Whether the size ``name`` may differ across accumulators and ranks (padded to the largest)."""
        return self._fixed[name] is None

    def _sizes(self) -> Dict[str, Tuple[int, bool]]:
        """Sizes as name -> (value, growable). Fixed sizes must match across ranks."""
        return {name: (size, self._growable(name)) for name, size in self._dims.items()}

    @torch.inference_mode(False)
    def _grow(self, name: str, size: int) -> None:
        """Enlarge every state along the size ``name`` to ``size``, padding with zeros."""
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
        """``_grow`` when ``size`` (None: nothing seen) is past the current one."""
        if size is not None and size > self._dims[name]:
            self._grow(name, size)

    @property
    def states(self) -> Mapping[str, Tensor]:
        """The current (local) sum-states, read-only view by name."""
        return dict(self._states)

    def reset(self) -> None:
        """Zero every sum, keeping sizes, device and dtype; the next batch sets a new shift."""
        for value in self._states.values():
            value.zero_()
        self._shift = None

    def _align(self, sizes: Dict[str, Tuple[int, bool]], other: str) -> None:
        for name, (mine, growable) in self._sizes().items():
            theirs = sizes[name][0]
            if theirs == mine:
                continue
            if not growable:
                raise ValueError(f"{type(self).__name__}: {name} differs: {mine} here, {theirs} in {other}")
            if theirs > mine:
                self._grow(name, theirs)

    def merge(self, other: "SumAccumulator") -> "SumAccumulator":
        """Add another accumulator's sums into this one (same type and settings)."""
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(other).__name__}({other._config()}) into "
                f"{type(self).__name__}({self._config()})"
            )
        other._ensure_allocated()
        self._ensure_allocated(_state_device(other._states))
        self._align(other._sizes(), "the other accumulator")
        if self._shift is None and other._shift is not None:
            # Nothing summed here yet (the first batch sets the shift): adopt theirs.
            self._shift = other._shift.to(next(iter(self._states.values())).device).clone()
        incoming = other._states_at(self._shift)
        for name, value in self._states.items():
            theirs = incoming[name].to(value.device)
            if theirs.shape != value.shape:  # the other one is smaller along a growable size
                theirs = _pad_to(theirs, value.shape)
            value.add_(theirs)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Copies of the sums plus the settings, for checkpoints."""
        self._ensure_allocated()
        out: Dict[str, Any] = {name: value.detach().clone() for name, value in self._states.items()}
        if self._SHIFTED:
            out["shift"] = None if self._shift is None else self._shift.detach().clone()
        out["config"] = self._config()
        out["sizes"] = {name: size for name, (size, _) in self._sizes().items()}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore sums saved by ``state_dict`` (settings must match).

        An accumulator with no sums yet makes them on the device of the saved
        tensors, unless it was given ``device=``: a state restored from a GPU
        checkpoint keeps running on that GPU instead of copying every later
        batch to the host. One that already has sums keeps their device.
        """
        self._ensure_allocated(_state_device(state))
        if state.get("config") != self._config():
            raise ValueError(f"state_dict settings {state.get('config')} do not match {self._config()}")
        sizes = state.get("sizes", {})
        self._align({k: (v, True) for k, v in sizes.items()}, "the state_dict")
        for name, value in self._states.items():
            if name not in state:
                raise KeyError(f"state_dict has no {name!r}")
            saved = torch.as_tensor(state[name])
            if saved.shape != value.shape:
                raise ValueError(f"state_dict {name!r} has shape {tuple(saved.shape)}, expected {tuple(value.shape)}")
            value.copy_(saved)
        if self._SHIFTED:
            saved_shift = state.get("shift")
            device = next(iter(self._states.values())).device
            if saved_shift is not None:
                self._shift = torch.as_tensor(saved_shift).to(device, self._shift_dtype()).clone()
            elif any(bool(v.ne(0).any()) for v in self._states.values()):
                # Sums saved before accumulators had a shift are of the features themselves: about 0.
                self._shift = torch.zeros(self._sizes()["num_features"][0], dtype=self._shift_dtype(), device=device)
            else:
                self._shift = None

    def _reduced_states(self, group: Any = None) -> "Tuple[OrderedDict[str, Tensor], Optional[Tensor]]":
        """(The sums over every rank of ``group`` as new tensors, their common shift); local state untouched."""
        dist = torch.distributed
        self._ensure_allocated()
        names = list(self._sizes())
        local_sizes = [self._sizes()[n][0] for n in names]
        device = next(iter(self._states.values())).device
        if names:
            # Max and min of every size in one all_reduce: [s, -s] under MAX.
            probe = torch.tensor(local_sizes + [-s for s in local_sizes], dtype=torch.int64, device=device)
            dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
            high, low = probe[: len(names)].tolist(), [-v for v in probe[len(names):].tolist()]
            for name, hi, lo in zip(names, high, low):
                if hi != lo and not self._sizes()[name][1]:
                    raise ValueError(
                        f"{type(self).__name__}: ranks disagree on {name} (from {lo} to {hi}); "
                        "every rank must score the same features and targets"
                    )
            self._align({n: (h, True) for n, h in zip(names, high)}, "another rank")
        shift = self._common_shift(group, device) if self._SHIFTED else None
        local = self._states_at(shift)
        if shift is not None:
            shift = shift.to(self._shift_dtype())
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in local.values()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        offset = 0
        for name, value in local.items():
            n = value.numel()
            out[name] = flat[offset: offset + n].view(value.shape).to(value.dtype)
            offset += n
        return out, shift

    def _common_shift(self, group: Any, device: torch.device) -> Optional[Tensor]:
        """The mean of the ranks' shifts in float64 (ranks without one do not count), or None on every rank."""
        dist = torch.distributed
        size = self._sizes()["num_features"][0]
        mine = torch.zeros(size + 1, dtype=torch.float64, device=device)
        if self._shift is not None:
            mine[:size] = self._shift.to(torch.float64)
            mine[size] = 1
        dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=group)
        count = float(mine[size].item())
        if count == 0:
            return None
        return mine[:size] / count

    def sync(self, group: Any = None) -> "SumAccumulator":
        """Replace the local sums with their sum over ``group`` (all ranks must call it).

        Call it once per set of updates: syncing twice counts the other
        ranks' data twice. ``compute()`` syncs a copy by itself instead.
        """
        if not _distributed_ready():
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        reduced, shift = self._reduced_states(group)
        for name, value in reduced.items():
            self._states[name].copy_(value)
        if shift is not None:
            self._shift = shift
        return self

    def compute(self, **kwargs: Any) -> Tensor:
        """The score of everything seen so far (on every rank, when distributed)."""
        self._ensure_allocated()
        if self.sync_on_compute and _distributed_ready():
            reduced, shift = self._reduced_states()
            return self._compute(self._with_shift(reduced, shift), **kwargs)
        return self._compute(self._with_shift(self._states, self._shift), **kwargs)

    # -- sums held by someone else (the torchmetrics metric keeps them as its states) --
    def _frame(self) -> Dict[str, Any]:
        """What the sums are relative to, in fixed shapes: {} for sums of the data themselves.

        Shifted sums: "has_shift" (a Python bool: whether a batch has set
        the frame) and "shift" [D] (zeros before the first batch). With the
        sums, this is everything ``_bind`` needs to rebuild the accumulator.
        """
        if not self._SHIFTED:
            return {}
        self._ensure_allocated()
        if self._shift is not None:
            return {"has_shift": True, "shift": self._shift}
        like = next(iter(self._states.values()))
        size = self._sizes()["num_features"][0]
        return {"has_shift": False, "shift": like.new_zeros(size, dtype=self._shift_dtype())}

    def _bind(self, states: Mapping[str, Tensor], frame: Optional[Mapping[str, Any]]) -> "SumAccumulator":
        """Take ``states`` as this accumulator's sums, not copies of them, and ``frame`` as their frame.

        ``update`` then adds into those tensors and ``merge`` / ``compute``
        read them, so sums kept elsewhere (torchmetrics states) are scored by
        this class's own arithmetic. Names, shapes and dtypes must be this
        accumulator's; an accumulator made without ``device=`` learns them on
        the meta device, which holds no memory.

        Args:
            states: name -> tensor, as ``states`` lays them out.
            frame: as ``_frame`` gives it (flags as Python bools or 0-dim
                tensors, which are read to the host); None: no batch yet.
        """
        self._ensure_allocated(torch.device("meta"))
        for name, mine in self._states.items():
            if name not in states:
                raise KeyError(f"{type(self).__name__}: no sum named {name!r} to bind")
            theirs = states[name]
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(
                    f"{type(self).__name__}: {name} is {tuple(theirs.shape)} {theirs.dtype}, "
                    f"expected {tuple(mine.shape)} {mine.dtype}"
                )
        self._states = OrderedDict((name, states[name]) for name in self._states)
        if self._SHIFTED:
            self._shift = frame["shift"] if frame is not None and bool(frame["has_shift"]) else None
        return self

    def _common_frame(self, frames: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
        """The frame to add sums about several ``frames`` (as ``_frame`` gives them) in, as ``sync`` takes it.

        The mean of the shifts that are set, in float64: symmetric in the
        parts, and what ``sync`` uses across ranks (``_common_shift``). None
        when no frame is set, or the sums are not shifted.
        """
        shifts = [f["shift"].to(torch.float64) for f in frames if self._SHIFTED and bool(f["has_shift"])]
        if not shifts:
            return None
        return {"has_shift": True, "shift": torch.stack(shifts).mean(0).to(self._shift_dtype())}


def _as_statistics(
    states: Mapping[str, Tensor], shift: Optional[Tensor], num_samples: Optional[int] = None
) -> SufficientStatistics:
    """A SufficientStatistics view of LogME's summed states (no copies).

    Args:
        states: LogME's states by name (gram [D, D], feature_sum [D],
            cross [C, D], target_sum [C], target_sq [C], num_samples []).
        shift: [D] what the sums are about, or None.
        num_samples: the view's N; None reads the "num_samples" state (a
            host read). N is kept in that state only: a view's own count is
            never read back.
    """
    if num_samples is None:
        num_samples = int(round(float(states["num_samples"].item())))
    return SufficientStatistics(
        states["gram"], states["feature_sum"], states["cross"], states["target_sum"], states["target_sq"],
        num_samples, shift,
    )


def _state_device(state: Mapping[str, Any]) -> Optional[torch.device]:
    """The device of the first tensor in a state (a state_dict or an accumulator's states)."""
    for value in state.values():
        if isinstance(value, Tensor):
            return value.device
    return None


def _pad_to(value: Tensor, shape: torch.Size) -> Tensor:
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out


class LogMEAccumulator(SumAccumulator):
    """Streaming LogME: ``update`` per batch, ``compute`` the score of all batches.

    Keeps the sufficient statistics (see ``SufficientStatistics``: the
    second moment [D, D], feature sum [D], per-class sums [C, D], target
    sums and y^T y [C], N) of the features minus a shift taken from the
    first batch: O(D^2 + D C) numbers, never the features.
    ``compute()`` equals ``logme`` on the concatenated batches.

    Args:
        num_features: D.
        num_classes: for classification. None grows the class dimension on
            update, which reads the batch's largest label back to the host
            once per update (a sync); pass it to keep updates sync-free.
        regression: float targets [B] or [B, K] instead of labels.
        num_targets: K for regression; None takes it from the first batch.
        dtype: precision of the sums and of compute (default float64).
        device: where the sums live; None: the device of the first batch.
        sync_on_compute: when a torch.distributed group is initialised,
            ``compute()`` sums the statistics across ranks first.
        check_inputs: check each batch for NaN/Inf and labels out of range,
            which reads one value back to the host per update. False keeps
            updates free of host syncs (with ``num_classes`` given); bad
            values then go unnoticed.
        max_iter, tol, method, legacy_evidence, absent_classes: as for
            :func:`torch_logme.logme`.
    """

    _SHIFTED = True
    # N is counted here only: a SufficientStatistics is a view of these states, made per update and
    # compute, whose own count is read from this one. Float64 whatever the sums' dtype: a float32
    # count stops being exact at 2**24 samples.
    options: LogMEOptions  # the solver settings too, not only dtype and device
    _AXES = {
        "gram": ("num_features", "num_features"), "feature_sum": ("num_features",),
        "cross": ("num_columns", "num_features"), "target_sum": ("num_columns",),
        "target_sq": ("num_columns",), "num_samples": (),
    }
    _STATE_DTYPES = {"num_samples": torch.float64}

    def __init__(
        self,
        num_features: int,
        num_classes: Optional[int] = None,
        *,
        regression: bool = False,
        num_targets: Optional[int] = None,
        dtype: torch.dtype = torch.float64,
        device: Device = None,
        sync_on_compute: bool = True,
        check_inputs: bool = True,
        max_iter: int = 11,
        tol: Optional[float] = None,
        method: str = "fixed_point",
        legacy_evidence: bool = False,
        absent_classes: str = "count",
    ) -> None:
        positive_int(num_features, "num_features")
        boolean(regression, "regression")
        if regression and num_classes is not None:
            raise ValueError("num_classes applies to classification only; use num_targets with regression=True")
        if not regression and num_targets is not None:
            raise ValueError("num_targets applies to regression only; use num_classes for classification")
        positive_int(num_classes, "num_classes", optional=True)
        positive_int(num_targets, "num_targets", optional=True)
        options = logme_options(
            dtype=dtype, device=device, max_iter=max_iter, tol=tol, method=method,
            legacy_evidence=legacy_evidence, absent_classes=absent_classes,
        )
        self.num_features = num_features
        self.regression = regression
        self.check_inputs = check_inputs
        columns = num_classes if not regression else num_targets
        super().__init__(
            {"num_features": num_features, "num_columns": columns}, options, sync_on_compute=sync_on_compute
        )

    # -- state ---------------------------------------------------------------
    def _growable(self, name: str) -> bool:
        # Regression targets without num_targets take their width from the first batch, then keep it.
        return name == "num_columns" and not self.regression and self._fixed[name] is None

    def _recentre(self, states: Mapping[str, Tensor], delta: Tensor) -> Dict[str, Tensor]:
        moved = _as_statistics(states, None).recentred_by(delta)
        return dict(states, gram=moved.gram, feature_sum=moved.feature_sum, cross=moved.cross)

    @property
    def num_columns(self) -> int:
        """C: classes seen so far (or fixed), or regression targets."""
        # 0 until the states exist, even when fixed: the value this property has always had there.
        return self._dims["num_columns"] if self._allocated else 0

    def _config(self) -> Dict[str, Any]:
        return {
            "num_features": self.num_features,
            "regression": self.regression,
            "fixed_columns": self._fixed["num_columns"],
            "dtype": str(self.options.dtype),
        }

    # -- the torchmetrics-style API -------------------------------------------
    def check_batch(self, features: Any, targets: Any, device: Optional[torch.device] = None) -> Inputs:
        """Validate one batch (features [B, D], targets) against these settings, on ``device``."""
        f = as_tensor(features, "features")
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(
                f"features must be [B, {self.num_features}] (batch x num_features), got shape {tuple(f.shape)}"
            )
        inputs = prepare(
            f, targets, regression=self.regression,
            num_classes=None if self.regression else self._fixed["num_columns"],
            device=device, batch=True, check_values=self.check_inputs,
        )
        check_magnitude(inputs, batch=True)
        return inputs

    def update(self, features: Any, targets: Any) -> None:
        """Add a batch: features [B, D] (any float dtype); labels [B] or targets [B] / [B, K]."""
        f = as_tensor(features, "features")
        device = self._device(f.device)
        inputs = self.check_batch(f, targets, device)
        self._ensure_allocated(device)
        if self.regression and self.num_columns == 0:
            self._grow("num_columns", inputs.num_columns)
        if inputs.num_columns != self.num_columns:
            if not self._growable("num_columns") and self.regression:
                raise ValueError(
                    f"targets have {inputs.num_columns} columns, expected {self.num_columns} as in earlier batches"
                )
            self._grow_to("num_columns", inputs.num_columns)
        with torch.no_grad():
            shift = self._take_shift(inputs.features, self.options.dtype, device)
            # The view's N is a dummy: reading the state's would cost a host sync per batch.
            view = _as_statistics(self._states, shift, num_samples=0)
            view.add_(inputs.features, inputs.targets, not self.regression)
            self._states["num_samples"].add_(inputs.num_samples)

    # Narrower than the base's **kwargs on purpose, as compute() below: LogME
    # takes only ``reduction``, and an unknown keyword should raise.
    def _compute(self, states: Mapping[str, Tensor], reduction: str = "mean") -> Tensor:  # type: ignore[override]
        one_of(reduction, "reduction", REDUCTIONS)
        n = int(states["num_samples"].item())
        if n < 2:
            raise ValueError(f"LogME needs at least 2 samples, got N = {n}; call update() first")
        if states["cross"].shape[0] == 0:
            raise ValueError("no class or target columns seen yet")
        stats = _as_statistics(states, states.get("shift"))
        with torch.no_grad():
            if not bool(stats.raw_gram().diagonal().gt(0).any()):
                raise ValueError(
                    "features are all zero (rank 0), or too small in magnitude (below about 1e-150) for "
                    "float64 sums of squares; expected non-zero values"
                )
            evidence = solve_statistics(stats, self.options)
            return reduce_columns(evidence, stats.target_sq, not self.regression, self.options, reduction)

    def compute(self, reduction: str = "mean") -> Tensor:  # type: ignore[override]
        """LogME of every batch so far: 0-dim ("mean", "sum") or [C] ("none")."""
        return super().compute(reduction=reduction)
