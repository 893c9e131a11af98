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

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_tensor, check_class_count, prepare
from ._options import ComputeOptions, LogMEOptions, logme_options
from ._validators import boolean, one_of, positive_int
from .functional import REDUCTIONS, check_magnitude, compute_evidence, reduce_columns
from .sums import SufficientStatistics

Device = Union[str, torch.device, None]
_Update = TypeVar("_Update", bound=Callable[..., None])

#: Slots for sizes in the header ranks exchange before reducing (no accumulator has more than two).
_HEADER_SIZES = 8
#: Bumped when the header's layout changes, so that ranks of two versions disagree instead of misreading.
_HEADER_VERSION = 1


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


class OwnLock:
    """Gives copies a lock of their own: a lock cannot be pickled or deep-copied (torchmetrics clones, pickles)."""

    _lock: Any

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()


class SumAccumulator(OwnLock):
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

    Guarantees (every accumulator, see docs/design.md):

    * An ``update`` is all or nothing. Everything that can be wrong with a
      batch (shapes, dtypes, NaN/Inf and label range when checked) is
      checked before any sum is touched; labels on the CPU are range-checked
      even with ``check_inputs=False``, since that costs no host sync (about
      5 us for 256 labels). A failed update also restores the sizes, shift,
      scale and lazily made states, so the accumulator is exactly as before.
      Not covered: labels out of range on an accelerator with
      ``check_inputs=False`` (checking them would cost the host sync that
      option exists to avoid), and errors of the arithmetic itself (out of
      memory) after the first sum was added to; ``reset`` or reload then.
    * ``load_state_dict`` checks every key, shape, dtype and setting before
      it changes anything: a failed load (ValueError naming the key) leaves
      the accumulator as it was.
    * Thread safety: ``update``, ``merge``, ``compute``, ``sync``,
      ``state_dict``, ``load_state_dict`` and ``reset`` hold a per-accumulator
      lock, so updates from several threads are all counted and the lazy
      allocation of the states happens once. Uncontended it costs about
      0.6 us per call (0.3% of a [8, 16] LogME update); ``merge`` locks this
      accumulator only, so the other one must not be updated meanwhile.
    * Across ranks (``sync``, ``compute`` with ``sync_on_compute``): before
      any sum is reduced the ranks exchange a fixed-size header (type,
      settings, each state's axes and dtype, sizes, whether ``sync`` has
      run) in one ``all_gather``; on any disagreement every rank raises the
      same ValueError naming what differs on which ranks, instead of one
      rank raising while the others wait in a collective. Growable sizes
      may differ (padded to the largest); fixed ones may not, except a size
      not set yet (0: a regression accumulator's width before its first
      batch), which takes the others' (so do merge and load_state_dict).
    * ``sync()`` makes the local sums the global ones, and ``compute()``
      after it does not reduce them again until the next ``update``,
      ``merge``, ``load_state_dict`` or ``reset`` (on every rank: ranks of
      which some synced and some did not raise). A second ``sync()`` with
      nothing new is a no-op.

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
        # Re-entrant: compute() and sync() call helpers that also lock, and an update may call its parent's.
        self._lock = threading.RLock()
        # True once sync() has made the local sums the global ones; any new data clears it.
        self._synced = False
        self.sync_on_compute = sync_on_compute
        self.options = options
        self._fixed: Dict[str, Optional[int]] = dict(sizes)
        self._dims: Dict[str, int] = {name: (value or 0) for name, value in sizes.items()}
        self._states: "OrderedDict[str, Tensor]" = OrderedDict()
        self._allocated = False
        self._shift: Optional[Tensor] = None
        if options.device is not None:
            self._allocate(options.device)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every score's own update becomes atomic and locked here, once, instead of in each subclass.
        if "update" in cls.__dict__:
            cls.update = _atomic_update(cls.__dict__["update"])  # type: ignore[attr-defined]

    def _snapshot(self) -> Dict[str, Any]:
        """The attributes a failed update restores (the containers copied; their tensors are not)."""
        saved = dict(self.__dict__)
        saved["_dims"] = dict(self._dims)
        saved["_states"] = OrderedDict(self._states)
        return saved

    def _restore(self, saved: Dict[str, Any]) -> None:
        self.__dict__.clear()
        self.__dict__.update(saved)

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
        if "class" in name or (name == "num_columns" and not getattr(self, "regression", True)):
            # Label ids set the class count: a stray huge one must not allocate first (_checks).
            elements = sum(math.prod(size if a == name else self._dims.get(a) or 1 for a in axes)
                           for axes in self._AXES.values())
            check_class_count(size, None, elements, f"{type(self).__name__}'s state", name)
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
        with self._lock:
            return dict(self._states)

    def reset(self) -> None:
        """Zero every sum, keeping sizes, device and dtype; the next batch sets a new shift."""
        with self._lock:
            for value in self._states.values():
                value.zero_()
            self._shift = None
            self._synced = False

    def _align(self, sizes: Dict[str, Tuple[int, bool]], other: str) -> None:
        for name, (mine, growable) in self._sizes().items():
            theirs = sizes[name][0]
            if not _sizes_fit(mine, theirs, growable):
                raise ValueError(f"{type(self).__name__}: {name} differs: {mine} here, {theirs} in {other}")
            if theirs > mine:
                self._grow(name, theirs)

    def merge(self, other: "SumAccumulator") -> "SumAccumulator":
        """Add another accumulator's sums into this one (same type and settings).

        Locks this accumulator only: ``other`` must not be updated meanwhile.
        """
        with self._lock:
            self._synced = False
            return self._merge(other)

    def _merge(self, other: "SumAccumulator") -> "SumAccumulator":
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
        with self._lock:
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

        Atomic: every key, size, shape and dtype is checked before anything
        changes, so a state_dict that is rejected (ValueError naming the
        missing or bad key) leaves the accumulator exactly as it was.
        """
        with self._lock:
            staged = self._stage_load(state)
            self._commit_load(*staged)

    def _stage_load(
        self, state: Mapping[str, Any]
    ) -> "Tuple[Dict[str, int], torch.device, Dict[str, Tensor], Optional[Tensor], bool]":
        """Check ``state`` against these settings and convert it, changing nothing here.

        Returns (the sizes after loading, the device, the states converted
        to their dtype and device, the shift or None, whether a shift must
        be made: sums saved before accumulators had one).
        """
        name_ = type(self).__name__
        if not isinstance(state, Mapping):
            raise ValueError(f"{name_}: a state_dict is a mapping, got {type(state).__name__}")
        if state.get("config") != self._config():
            raise ValueError(f"state_dict settings {state.get('config')} do not match {self._config()}")
        sizes = state.get("sizes")
        if not isinstance(sizes, Mapping):
            raise ValueError(f"{name_}: state_dict has no 'sizes' mapping (got {sizes!r})")
        dims = dict(self._dims)
        for size_name, (mine, growable) in self._sizes().items():
            theirs = sizes.get(size_name)
            if isinstance(theirs, bool) or not isinstance(theirs, int) or theirs < 0:
                raise ValueError(f"{name_}: state_dict 'sizes' has no valid {size_name!r} (got {theirs!r})")
            if not _sizes_fit(mine, theirs, growable):
                raise ValueError(f"{name_}: {size_name} differs: {mine} here, {theirs} in the state_dict")
            dims[size_name] = max(mine, theirs)
        if self._allocated:
            device = next(iter(self._states.values())).device
        else:
            device = self.options.device or _default_device(_state_device(state))
        staged: Dict[str, Tensor] = {}
        for name, axes in self._AXES.items():
            if name not in state:
                raise ValueError(f"{name_}: state_dict has no {name!r}")
            saved = _numeric_tensor(state[name], name)
            declared = tuple(sizes[a] for a in axes)
            if tuple(saved.shape) != declared:
                raise ValueError(f"state_dict {name!r} has shape {tuple(saved.shape)}, expected {declared}")
            dtype = self._states[name].dtype if self._allocated else self._STATE_DTYPES.get(name, self.options.dtype)
            staged[name] = saved.to(device, dtype)
            shape = torch.Size(dims[a] for a in axes)
            if staged[name].shape != shape:  # smaller along a size that pads (fewer classes than here)
                staged[name] = _pad_to(staged[name], shape)
        shift: Optional[Tensor] = None
        zero_shift = False
        if self._SHIFTED:
            saved_shift = state.get("shift")
            if saved_shift is not None:
                shift = _numeric_tensor(saved_shift, "shift")
                if tuple(shift.shape) != (dims["num_features"],):
                    raise ValueError(
                        f"state_dict 'shift' has shape {tuple(shift.shape)}, expected ({dims['num_features']},)"
                    )
            else:
                # Sums saved before accumulators had a shift are of the features themselves: about 0.
                zero_shift = any(bool(v.ne(0).any()) for v in staged.values())
        return dims, device, staged, shift, zero_shift

    def _commit_load(
        self, dims: Dict[str, int], device: torch.device, staged: Dict[str, Tensor], shift: Optional[Tensor],
        zero_shift: bool,
    ) -> None:
        """Take what ``_stage_load`` checked (nothing here can fail on a valid state)."""
        if not self._allocated:
            self._dims.update(dims)
            self._allocate(device)
        else:
            for size_name, size in dims.items():
                self._grow_to(size_name, size)
        # In place: sums bound elsewhere (the torchmetrics states) stay the same tensors.
        for name, value in self._states.items():
            value.copy_(staged[name])
        if self._SHIFTED:
            if shift is not None:  # a copy: the accumulator must not share the caller's tensor
                shift = shift.to(device, self._shift_dtype()).clone()
            elif zero_shift:
                shift = torch.zeros(self._dims["num_features"], dtype=self._shift_dtype(), device=device)
            self._shift = shift
        self._synced = False

    # -- across ranks ------------------------------------------------------------
    def _description(self) -> Dict[str, Any]:
        """What must be the same on every rank, flat: type, settings, each state's axes and dtype."""
        out: Dict[str, Any] = {"accumulator type": type(self).__qualname__}
        for key, value in self._config().items():
            if isinstance(value, Mapping):  # e.g. the fixed sizes: one entry each, named as the size
                out.update({k if k not in out else f"{key} {k}": v for k, v in value.items()})
            else:
                out[key] = value
        for name, axes in self._AXES.items():
            dtype = self._states[name].dtype if name in self._states else self._STATE_DTYPES.get(
                name, self.options.dtype)
            out[f"state {name!r}"] = f"{dtype} over {axes}"
        return out

    def _header(self, device: torch.device) -> Tensor:
        """[4 + _HEADER_SIZES] int64: version, a digest of ``_description``, synced, the sizes."""
        sizes = self._sizes()
        if len(sizes) > _HEADER_SIZES:
            raise NotImplementedError(f"{type(self).__name__}: more than {_HEADER_SIZES} sizes")
        digest = hashlib.blake2b(repr(sorted(self._description().items())).encode(), digest_size=8).digest()
        values = [_HEADER_VERSION, int.from_bytes(digest, "little", signed=True), int(self._synced), len(sizes)]
        values += [size for size, _ in sizes.values()] + [0] * (_HEADER_SIZES - len(sizes))
        return torch.tensor(values, dtype=torch.int64, device=device)

    def _agree(self, group: Any) -> "Tuple[Dict[str, int], bool]":
        """Check that every rank of ``group`` holds compatible sums; the largest sizes and whether all synced.

        One ``all_gather`` of a fixed-size header; every rank reads the same
        headers, so every rank takes the same branch: on a disagreement
        each gathers the others' descriptions (one more collective, on the
        error path only) and raises the same ValueError.
        """
        dist = torch.distributed
        self._ensure_allocated()
        device = next(iter(self._states.values())).device
        mine = self._header(device)
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        headers = [h.tolist() for h in gathered]
        names = list(self._sizes())
        growable = [self._sizes()[n][1] for n in names]
        same_kind = all(h[:2] == headers[0][:2] and h[3] == headers[0][3] for h in headers)
        # A fixed size of 0 is one not set yet (see _sizes_fit): it agrees with any.
        fixed_agree = same_kind and all(
            len({h[4 + i] for h in headers} - {0}) <= 1 for i in range(len(names)) if not growable[i])
        synced = {h[2] for h in headers}
        if not (same_kind and fixed_agree and len(synced) == 1):
            self._raise_disagreement(group, world)
        high = {n: max(h[4 + i] for h in headers) for i, n in enumerate(names)}
        return high, synced == {1}

    def _raise_disagreement(self, group: Any, world: int) -> None:
        """Gather every rank's description and raise the same ValueError on every rank."""
        dist = torch.distributed
        mine = dict(self._description())
        for size_name, (size, growable) in self._sizes().items():
            if not growable:
                mine[size_name if size_name not in mine else f"size {size_name}"] = size
        mine["synced"] = self._synced
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
        if len({d["accumulator type"] for d in everyone}) > 1:
            keys = ["accumulator type"]  # the rest is not comparable across types
        else:
            keys = [k for k in everyone[0] if len({repr(d.get(k)) for d in everyone}) > 1]
        parts = []
        for key in keys:
            if key == "synced":
                ranks = [r for r, d in enumerate(everyone) if d["synced"]]
                parts.append(
                    f"whether sync() ran since the last update/merge/load/reset (ranks {ranks} synced, the "
                    "others not): call sync() on every rank, or on none"
                )
            else:
                values = ", ".join(f"rank {r}: {d.get(key)!r}" for r, d in enumerate(everyone))
                parts.append(f"{key} ({values})")
        # Named from the gathered descriptions, not this rank's type: the message must be the same on every rank.
        kinds = " / ".join(sorted({d["accumulator type"] for d in everyone}))
        raise ValueError(
            f"{kinds}: ranks disagree on " + "; ".join(parts or ["their headers"])
            + "; every rank must score the same features and targets with the same accumulator and settings"
        )

    def _reduced_states(
        self, group: Any, high: Mapping[str, int]
    ) -> "Tuple[OrderedDict[str, Tensor], Optional[Tensor]]":
        """(The sums over every rank of ``group`` as new tensors, their common shift); local state untouched.

        ``high``: the largest sizes over the ranks, as ``_agree`` gives them
        (the local states are padded to them first).
        """
        dist = torch.distributed
        self._ensure_allocated()
        device = next(iter(self._states.values())).device
        self._align({n: (h, True) for n, h in high.items()}, "another rank")
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

        After it the local sums are the global ones: ``compute()`` scores
        them without reducing again, and a second ``sync()`` is a no-op,
        until the next ``update``, ``merge``, ``load_state_dict`` or
        ``reset``. Ranks that disagree (settings, fixed sizes, or some
        synced and some not) all raise the same ValueError.
        """
        if not _distributed_ready():
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        with self._lock:
            high, synced = self._agree(group)
            if synced:
                return self
            reduced, shift = self._reduced_states(group, high)
            for name, value in reduced.items():
                self._states[name].copy_(value)
            if shift is not None:
                self._shift = shift
            self._synced = True
            return self

    def compute(self, **kwargs: Any) -> Tensor:
        """The score of everything seen so far (on every rank, when distributed).

        With ``sync_on_compute`` and a process group, the sums of every
        rank are reduced into a copy first, unless ``sync()`` already made
        the local sums the global ones.
        """
        with self._lock:
            self._ensure_allocated()
            if self.sync_on_compute and _distributed_ready():
                high, synced = self._agree(None)
                if not synced:
                    reduced, shift = self._reduced_states(None, high)
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
        self._synced = False
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


def _sizes_fit(mine: int, theirs: int, growable: bool) -> bool:
    """Whether sums of size ``theirs`` along a size can be added to (or loaded over) sums of size ``mine``.

    A growable size pads to the larger. A fixed one must be equal, except
    that 0 is a size not set yet (a regression accumulator's target columns
    before its first batch, when num_targets was not given): nothing was
    summed along it, so it fits any, and takes the other's.
    """
    return growable or mine == theirs or mine == 0 or theirs == 0


def _pad_to(value: Tensor, shape: torch.Size) -> Tensor:
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out


def _numeric_tensor(value: Any, key: str) -> Tensor:
    """A saved state as a real-valued tensor; ValueError naming ``key`` otherwise."""
    try:
        out = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"state_dict {key!r} is not a tensor: {err}") from err
    if out.is_complex() or out.dtype == torch.bool:
        raise ValueError(f"state_dict {key!r} has dtype {out.dtype}, expected a real number type")
    return out


def _check_labels_on_host(labels: Tensor, limit: Optional[int], name: str) -> None:
    """Range-check labels [B] against ``limit`` classes when that costs no host sync (CPU tensors).

    Updates with ``check_inputs=False`` skip the checks that read values
    back from an accelerator; on the CPU reading is free, and an
    out-of-range label would otherwise fail inside the in-place sums (an
    IndexError or RuntimeError after some sums were added). Checked here,
    before any sum is touched, it is a ValueError and the update changes
    nothing.
    """
    if limit is None or labels.device.type != "cpu" or labels.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0:
        raise ValueError(f"class labels ({name}) must be non-negative integers, got minimum {low}")
    if high >= limit:
        raise ValueError(f"class label {high} is out of range for {name}={limit}")


def _atomic_update(update: _Update) -> _Update:
    """``update`` under the accumulator's lock, leaving it as it was when it raises.

    What a failed update may have changed before raising (sizes grown,
    states made lazily, the shift and scale of a first batch) is put back
    from a snapshot of the attributes, which copies no tensor: the batch
    is validated before any sum is added to, so no sum needs restoring.
    A successful update clears the synced flag (new local data).
    """
    @functools.wraps(update)
    def locked(self: SumAccumulator, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            saved = self._snapshot()
            try:
                update(self, *args, **kwargs)
            except BaseException:
                self._restore(saved)
                raise
            self._synced = False
    return locked  # type: ignore[return-value]


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
        max_iter: as for :func:`torch_logme.logme`.
        tol: as for :func:`torch_logme.logme`.
        method: as for :func:`torch_logme.logme`.
        legacy_evidence: as for :func:`torch_logme.logme`.
        absent_classes: as for :func:`torch_logme.logme`.
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
        """Run every check ``update`` runs on a batch (features [B, D], targets), on ``device``, adding nothing."""
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
        if not self.regression and not self.check_inputs:  # free on the CPU; see _check_labels_on_host
            _check_labels_on_host(inputs.targets, self._fixed["num_columns"], "num_classes")
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
            evidence, counts = compute_evidence(stats, self.options)
            return reduce_columns(evidence, counts, not self.regression, self.options, reduction)

    def compute(self, reduction: str = "mean") -> Tensor:  # type: ignore[override]
        """LogME of every batch so far: 0-dim ("mean", "sum") or [C] ("none")."""
        return super().compute(reduction=reduction)
