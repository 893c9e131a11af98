"""Transferability scores as torchmetrics ``Metric``s (optional: ``pip install torch_logme[torchmetrics]``).

:class:`TransferabilityMetric` takes any registered streaming score by name
(``torch_logme.SCORES``); :class:`LogMEMetric` is its LogME case with the
historical signature.

The metric keeps the score's streaming accumulator's sums as its states and
lets the accumulator do every piece of arithmetic: ``update`` binds an
accumulator to the states (``SumAccumulator._bind``) and adds the batch
into them in place; ``compute`` binds one per part of the states, merges
them and scores the total with the accumulator's own ``compute``.

Why parts: an accumulator's sums are taken about a frame, a shift [D] from
its first batch (and, for most feature scores, a power-of-two scale [D]),
and each process has its own. Sums about different frames cannot be added
as they stand, so every state carries a leading axis of one part and is
registered with ``dist_reduce_fx="cat"``: torchmetrics' own sync gathers
the processes' parts, and ``compute`` adds them about one frame (the mean
of their shifts, the coarsest scale: ``_common_frame``, what the
accumulator's own ``sync`` uses) with the accumulator's ``merge``, which
recentres and rescales exactly. ``forward`` and ``merge_state`` stack parts
the same way; the metric merges them back to one part at once, so states
keep their size however often it is called.

torchmetrics states have fixed shapes, so every size of the sums (the
number of classes; for a score of source-class predictions, also the
number of source classes) must be given up front.

A score that cannot stream (``SCORES[name].streams`` is False) has no sums:
``TransferabilityMetric(name, ...)`` then gives a :class:`CollectedScoreMetric`,
which keeps every batch in list states (gathered with ``"cat"`` across
processes, as torchmetrics' own ranking metrics do) and scores them all in
``compute``; its memory grows with the number of samples.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module

try:
    from torchmetrics import Metric
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_logme.integrations.torchmetrics needs torchmetrics: pip install 'torch_logme[torchmetrics]'"
    ) from err

from ..collecting import CollectingAccumulator
from ..functional import REDUCTIONS
from ..registry import SCORES, accumulator_keywords, get_score, streaming_spec
from ..streaming import SumAccumulator

__all__ = ["TransferabilityMetric", "LogMEMetric", "CollectedScoreMetric"]

#: Accumulator keywords the metric sets itself: states move with ``.to()``, and torchmetrics syncs.
_METRIC_OWNED = ("device", "sync_on_compute")


def _init_metric(metric: Metric, spec: Any, kwargs: Dict[str, Any], name: str) -> Dict[str, Any]:
    """Initialise ``metric`` as a torchmetrics Metric with ``kwargs`` less the score's own options, returned.

    The metric's explicit arguments (dtype, check_inputs) and the keywords it
    sets itself are not the score's options here; anything neither the score
    nor torchmetrics takes is a ValueError listing the score's options.
    """
    owned = ("dtype", "check_inputs") + _METRIC_OWNED
    own = tuple(k for k in accumulator_keywords(spec, keyword_only=True) if k not in owned)
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in own}
    try:
        Metric.__init__(metric, **kwargs)
    except ValueError as err:
        if "Unexpected keyword" not in str(err):
            raise
        raise ValueError(f"{name}: {err}; the score's options are: {', '.join(own)}") from err
    return options


def _device_only(fn: Callable[[Tensor], Tensor], value: Tensor) -> Tensor:
    """``fn(value)`` when it keeps the dtype; else ``value`` moved where ``fn`` sent it, dtype unchanged."""
    moved = fn(value)
    return moved if moved.dtype == value.dtype else value.to(moved.device)


class TransferabilityMetric(Metric):
    """A registered streaming transferability score of all batches seen, as a torchmetrics metric.

    Named like the package's other entry points (``LogMEAccumulator``,
    ``LogMEMetric``): the quantity, then what it is; ``score=`` picks which
    transferability score, as ``torch_logme.SCORES`` names it.

    Args:
        score: a key of ``torch_logme.SCORES``. For a score that cannot
            stream (``SCORES[score].streams`` False) the metric made is a
            :class:`CollectedScoreMetric` (not an instance of this class),
            which keeps every batch.
        num_features: the width of the batches: D for a score that reads
            features [B, D]; Cs, the number of source classes, for one that
            reads source-class probabilities [B, Cs] (``spec.input``).
        num_classes: C, the number of target classes. Required (states
            cannot grow) unless a score option fixes the target columns
            instead.
        dtype: precision of the sums and of compute (default float64).
            Module-wide casts (``.to(dtype)``, ``set_dtype``, Lightning's
            "16-true" precision) move the states but keep this dtype: the
            sums' precision is the score's, and a shift cast to another
            dtype would no longer be the one the sums were taken about.
        check_inputs: check each batch (NaN/Inf, labels in range): one host
            read per update. False keeps updates free of host syncs.
        **kwargs: the score's own options (the keyword-only arguments of its
            accumulator, e.g. ``rcond``, ``eps``, ``min_variance``), and
            torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ``dist_sync_fn``, ``compute_with_cache``, ...).

    Use ``update(inputs [B, W], targets [B])`` per batch and ``compute()``
    per epoch: a 0-dim tensor equal to ``SCORES[score].fn`` on all batches.
    Calling the metric (``forward``) also returns the batch's own score,
    which costs one score evaluation and needs a batch the score accepts
    (B >= 2). ``higher_is_better`` follows the score's spec.

    Raises:
        ValueError: for an unknown score, a missing ``num_features`` or
            ``num_classes`` (streaming scores), or an option
            neither the score nor torchmetrics takes.
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None  # set per instance from the score's spec
    full_state_update = False

    def __new__(cls, score: Any = None, *args: Any, **kwargs: Any) -> Any:
        # A score without sums is kept batch by batch: a metric of another kind, built here.
        spec = SCORES.get(score) if isinstance(score, str) else None
        if cls is TransferabilityMetric and spec is not None and not spec.streams:
            return CollectedScoreMetric(score, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        score: str,
        num_features: Optional[int] = None,
        num_classes: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float64,
        check_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}(score={score!r})"
        try:
            spec = streaming_spec(score)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        cls = spec.accumulator_cls
        assert cls is not None  # streaming_spec checked it
        options = _init_metric(self, spec, kwargs, name)
        if num_features is None:
            width = ("D, the width of the feature batches" if spec.input == "features"
                     else "Cs, the number of source classes (the width of the probability batches)")
            raise ValueError(f"{name} needs num_features: {width}")
        # The template holds the settings and tells the layout; on the meta device its sums take no memory.
        # Every streaming accumulator takes (width, classes) as its two positional arguments.
        self._template: SumAccumulator = cls(
            num_features, num_classes, dtype=dtype, check_inputs=check_inputs, device="meta",
            sync_on_compute=False, **options,
        )
        unset = [key for key, (size, growable) in self._template._sizes().items() if growable or size == 0]
        if unset:
            needed = "num_classes" if num_classes is None else "every size of the score's sums"
            raise ValueError(
                f"{name} needs {needed}: torchmetrics states have fixed shapes, so the sizes of the score's "
                f"sums must be given up front (not set: {', '.join(unset)})"
            )
        object.__setattr__(self, "higher_is_better", spec.larger_is_better)  # torchmetrics guards the name
        self.score = score
        self.spec = spec
        self.num_features = num_features
        self.num_classes = num_classes
        self.options = options
        #: Keywords for the accumulator's compute (a subclass may set some: LogMEMetric's reduction).
        self._compute_options: Dict[str, Any] = {}
        # Every state has a leading axis of parts; one part outside sync, forward and merge_state.
        self._shapes: Dict[str, torch.Size] = {}
        layout = dict(self._template.states)
        self._sum_names = tuple(layout)
        for key, value in self._template._frame().items():
            layout[key] = torch.as_tensor(value)  # flags as 0-dim bool tensors
        self._frame_names = tuple(k for k in layout if k not in self._sum_names)
        for key, value in layout.items():
            self._shapes[key] = value.shape
            self.add_state(key, torch.zeros(1, *value.shape, dtype=value.dtype), dist_reduce_fx="cat")
        self._live: Optional[Tuple[Tuple[Tensor, ...], SumAccumulator]] = None
        self._bind_live(known_empty=True)

    # -- the accumulators on the states ------------------------------------------------
    def _parts(self) -> List[Dict[str, Tensor]]:
        """Views of the states of each part: one, or one per process after a sync."""
        split = {key: getattr(self, key).reshape(-1, *shape) for key, shape in self._shapes.items()}
        counts = {value.shape[0] for value in split.values()}
        if len(counts) != 1:
            raise RuntimeError(f"{type(self).__name__}: states disagree on their number of parts: {counts}")
        return [
            {key: value[k] for key, value in split.items()}
            for k in range(counts.pop())
        ]

    def _bound(self, sums: Mapping[str, Tensor], frame: Optional[Mapping[str, Any]]) -> SumAccumulator:
        """A new accumulator of the score whose sums are ``sums`` (not copies) about ``frame`` (None: unset)."""
        return copy.deepcopy(self._template)._bind(sums, frame)  # the template's tensors are meta: no copy

    def _accumulator(self, part: Mapping[str, Tensor], flags: Optional[Mapping[str, Any]] = None,
                     known_empty: bool = False) -> SumAccumulator:
        """A new accumulator on the tensors of ``part`` (sums and frame, not copies).

        ``flags`` gives frame flags known on the host; the others are read
        from the part (one host read each). ``known_empty``: the part was
        just reset, no frame to read.
        """
        sums = {key: part[key] for key in self._sum_names}
        if known_empty:
            return self._bound(sums, None)
        return self._bound(sums, dict({key: part[key] for key in self._frame_names}, **(flags or {})))

    def _state_refs(self) -> Tuple[Tensor, ...]:
        return tuple(getattr(self, key) for key in self._shapes)

    def _live_accumulator(self) -> Optional[SumAccumulator]:
        """The accumulator bound to the current one-part states, if they are still the ones it was bound to.

        torchmetrics replaces state tensors (reset, sync, load, .to()) rather
        than writing into them, so identity tells whether the binding holds.
        """
        if self._live is None:
            return None
        refs, acc = self._live
        if all(a is b for a, b in zip(refs, self._state_refs())):
            return acc
        self._live = None
        return None

    def _bind_live(self, known_empty: bool = False, flags: Optional[Mapping[str, Any]] = None) -> SumAccumulator:
        """Bind an accumulator to the one-part states, for update to add into."""
        (part,) = self._parts()
        acc = self._accumulator(part, flags, known_empty=known_empty)
        self._live = (self._state_refs(), acc)
        return acc

    def _merged(self, parts: Sequence[Mapping[str, Tensor]], common_frame: bool) -> SumAccumulator:
        """A new accumulator holding the sum of ``parts``, added by the accumulator's merge; ``parts`` stay as they are.

        Args:
            parts: the states of each part (``_parts``).
            common_frame: sum about the mean of the parts' shifts (the
                accumulator's ``_common_frame``, as its ``sync`` across ranks),
                which does not depend on the parts' order; False: about the
                first part's frame, which then is not moved (as ``merge``).
        """
        first = parts[0]
        if common_frame:
            accs = [self._accumulator(part) for part in parts]
            frame = self._template._common_frame([acc._frame() for acc in accs])
            total = self._bound({key: torch.zeros_like(first[key]) for key in self._sum_names}, frame)
        else:  # merge adds into it: a copy of the first part
            total = self._accumulator({key: value.clone() for key, value in first.items()})
            accs = [self._accumulator(part) for part in parts[1:]]
        for acc in accs:
            total.merge(acc)
        return total

    @torch.inference_mode(False)  # states made in inference mode could not be updated in place afterwards
    @torch.no_grad()
    def _compact(self, common_frame: bool = False) -> None:
        """Merge the parts of the states into one (exact: recentring and rescaling are algebra on the sums)."""
        parts = self._parts()
        if len(parts) == 1:
            return
        total = self._merged(parts, common_frame)
        frame = total._frame()
        device = getattr(self, self._sum_names[0]).device
        for key, value in total.states.items():
            setattr(self, key, value.unsqueeze(0))
        for key, value in frame.items():
            setattr(self, key, torch.as_tensor(value, device=device).unsqueeze(0))
        # The flags are known here: no host read to bind the next update.
        self._bind_live(flags={key: value for key, value in frame.items() if not isinstance(value, Tensor)})

    # -- torchmetrics API ---------------------------------------------------------------
    def update(self, inputs: Any, targets: Any) -> None:
        """Add a batch.

        Args:
            inputs: features [B, D] (any float dtype), or for a score that
                reads source-class probabilities, probabilities [B, Cs]
                (or hard source labels [B]).
            targets: class ids [B] in [0, C), or what the score's
                accumulator takes as targets.
        """
        acc: Any = self._live_accumulator()  # the score's accumulator class, with its update
        if acc is None:  # the states were replaced (loaded, moved, restored after a sync): bind them again
            self._compact()
            acc = self._live_accumulator()
            if acc is None:
                acc = self._bind_live()
        framed = acc.shift is not None
        acc.update(inputs, targets)
        if not framed and acc.shift is not None:
            # The first batch set the frame: store it beside the sums (once per reset).
            with torch.no_grad():
                for key, value in acc._frame().items():
                    state = getattr(self, key)[0]
                    if isinstance(value, Tensor):
                        state.copy_(value)
                    else:
                        state.fill_(value)

    def compute(self) -> Tensor:
        """The score of every batch since the last reset (of every process, once torchmetrics has synced).

        Returns:
            0-dim tensor on the states' device (LogMEMetric: [C] with reduction="none").
        """
        parts = self._parts()
        acc = self._live_accumulator() if len(parts) == 1 else None
        if acc is None:
            # One part: bound as it is (compute only reads); several (synced): added about their common frame.
            acc = self._accumulator(parts[0]) if len(parts) == 1 else self._merged(parts, common_frame=True)
        return acc.compute(**self._compute_options)

    @torch.inference_mode(False)  # as _compact: fresh states must stay writable outside inference mode
    def reset(self) -> None:
        """Forget every batch (the next one sets a new frame)."""
        super().reset()
        self._bind_live(known_empty=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The batch's own score, while adding the batch to the global states (see torchmetrics)."""
        value = super().forward(*args, **kwargs)
        self._compact()  # forward stacked the batch's part under the global one
        return value

    def merge_state(self, incoming_state: Union[Dict[str, Any], "Metric"]) -> None:
        """Add another metric's states (or a dict of them) to these; their frames may differ."""
        if isinstance(incoming_state, Metric) and (
            not isinstance(incoming_state, TransferabilityMetric)
            or incoming_state._template._config() != self._template._config()
            or type(incoming_state._template) is not type(self._template)
        ):
            raise ValueError(f"cannot merge {incoming_state!r} into {self!r}: different scores or settings")
        super().merge_state(incoming_state)
        self._computed = None  # torchmetrics keeps a cached compute() across merge_state
        self._compact(common_frame=True)  # symmetric in the two metrics

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> Module:
        # States go where fn sends them but keep their dtype (see the class docstring, ``dtype``).
        keep = tuple(exclude_state)
        super()._apply(fn, exclude_state=keep + tuple(self._shapes))  # returns self
        for key in self._shapes:
            if key not in keep:
                default = self._defaults[key]
                assert isinstance(default, Tensor)  # every state here is a tensor
                self._defaults[key] = _device_only(fn, default)
                setattr(self, key, _device_only(fn, getattr(self, key)))
        self._live_accumulator()  # drops a binding to tensors that moved
        return self

    def __getstate__(self) -> Dict[str, Any]:
        # The bound accumulator holds views of the states; a copy binds its own on first use.
        state = super().__getstate__()
        state["_live"] = None
        return state

    def extra_repr(self) -> str:
        return f"score={self.score!r}, num_features={self.num_features}, num_classes={self.num_classes}"


class LogMEMetric(TransferabilityMetric):
    """LogME of all batches seen, as a torchmetrics metric.

    ``TransferabilityMetric("logme", ...)`` with LogME's historical
    signature, regression targets and per-class reductions.

    Args:
        num_features: D.
        num_classes: C, required for classification (states cannot grow).
        regression: float targets [B] or [B, K] instead of labels.
        num_targets: K, required with ``regression=True``.
        reduction: what ``compute()`` returns: "mean" (the score, 0-dim),
            "sum", or "none" (one score per column, [C]).
        dtype: precision of the sums and of compute (default float64).
        check_inputs: as for :class:`torch_logme.LogMEAccumulator`.
        max_iter: as for :class:`torch_logme.LogMEAccumulator`.
        tol: as for :class:`torch_logme.LogMEAccumulator`.
        method: as for :class:`torch_logme.LogMEAccumulator`.
        legacy_evidence: as for :class:`torch_logme.LogMEAccumulator`.
        absent_classes: as for :class:`torch_logme.LogMEAccumulator`.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``,
            ``process_group``, ``dist_sync_fn``, ...).

    Use ``update(features [B, D], labels [B])`` per batch and ``compute()``
    per epoch. Calling the metric (``forward``) also scores the batch alone,
    which costs one eigendecomposition and needs B >= 2.
    """

    higher_is_better = True

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
        columns = num_targets if regression else num_classes
        if columns is None:
            needed = "num_targets (with regression=True)" if regression else "num_classes"
            raise ValueError(f"LogMEMetric needs {needed}: torchmetrics states have fixed shapes")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        super().__init__(
            "logme", num_features, num_classes, dtype=dtype, check_inputs=check_inputs, regression=regression,
            num_targets=num_targets, max_iter=max_iter, tol=tol, method=method, legacy_evidence=legacy_evidence,
            absent_classes=absent_classes, **kwargs,
        )
        self.num_columns = columns
        self.regression = regression
        self.reduction = reduction
        self.check_inputs = check_inputs
        self._compute_options = {"reduction": reduction}

    def update(self, features: Any, targets: Any) -> None:
        """Add a batch: features [B, D]; labels [B] in [0, C), or targets [B] / [B, K]."""
        super().update(features, targets)


class CollectedScoreMetric(Metric):
    """A registered score that cannot stream, as a torchmetrics metric: every batch kept, scored at ``compute``.

    ``TransferabilityMetric(score, ...)`` gives one for such a score. The
    rows [B, W] and labels [B] of every batch are list states, gathered
    across processes by torchmetrics (``"cat"``); ``compute()`` equals
    ``SCORES[score].fn`` on all of them. Memory: every row, N x W values.

    Args:
        score: a key of ``torch_logme.SCORES``.
        num_features: the width W of the batches (checked on update); None:
            the first batch's.
        num_classes: accepted for a signature like ``TransferabilityMetric``'s;
            the labels set the classes.
        dtype: the compute precision of the score. Module-wide casts
            (``.half()``, ``set_dtype``) move the kept rows but keep their dtype.
        check_inputs: accepted for a signature like ``TransferabilityMetric``'s;
            every batch is checked (one host read), as nothing is summed.
        **kwargs: the score's own options (its functional form's keywords)
            and torchmetrics ``Metric`` options.
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None
    full_state_update = False

    def __init__(
        self, score: str, num_features: Optional[int] = None, num_classes: Optional[int] = None, *,
        dtype: torch.dtype = torch.float64, check_inputs: bool = True, **kwargs: Any,
    ) -> None:
        spec = get_score(score)
        options = _init_metric(self, spec, kwargs, f"TransferabilityMetric(score={score!r})")
        # The checks and the scoring are the collecting accumulator's; the metric only keeps the batches.
        self._checker = CollectingAccumulator(spec, num_features, dtype=dtype, sync_on_compute=False, **options)
        object.__setattr__(self, "higher_is_better", spec.larger_is_better)
        self.score, self.spec, self.num_features, self.num_classes = score, spec, num_features, num_classes
        self.add_state("rows", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, inputs: Any, targets: Any) -> None:
        """Keep a batch: rows [B, W] (features, or source-class probabilities) and class ids [B]."""
        rows, labels = self._checker.check_batch(inputs, targets, self.device)
        kept_rows: Any = self.rows  # a list state (torchmetrics types states as modules or tensors)
        width = kept_rows[0].shape[1] if kept_rows else None
        if width is not None and rows.shape[1] != width:
            raise ValueError(f"inputs must be [B, {width}] as in earlier batches, got shape {tuple(rows.shape)}")
        kept_rows.append(rows.detach().clone())
        kept_labels: Any = self.labels
        kept_labels.append(labels.detach().clone())

    def compute(self) -> Tensor:
        """The score of every batch since the last reset (of every process, once torchmetrics has synced)."""
        return self._accumulator().compute()

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # torchmetrics' gather of list states cannot take a rank without rows (its placeholder has another
        # shape and dtype: gloo aborts); the collecting accumulator's gather agrees on a header first.
        acc = self._accumulator()
        rows, labels = acc._gathered(process_group)
        self.rows = [rows]
        self.labels = [labels]

    def _accumulator(self) -> CollectingAccumulator:
        """A collecting accumulator holding this metric's rows (not copies)."""
        acc = copy.copy(self._checker)
        kept: List[Any] = []
        states: Tuple[Any, Any] = (self.rows, self.labels)
        for value in states:  # lists, or tensors once synced
            kept.append([value] if isinstance(value, Tensor) else list(value))
        acc._rows, acc._labels = kept
        return acc

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> Module:
        # The kept rows go where fn sends them but keep their dtype, as TransferabilityMetric's sums do.
        keep = tuple(exclude_state)
        super()._apply(fn, exclude_state=keep + ("rows", "labels"))
        for key in ("rows", "labels"):
            if key not in keep:
                value: Any = getattr(self, key)
                moved = [_device_only(fn, v) for v in value] if isinstance(value, list) else _device_only(fn, value)
                setattr(self, key, moved)
        return self

    def extra_repr(self) -> str:
        return f"score={self.score!r}, num_features={self.num_features}"
