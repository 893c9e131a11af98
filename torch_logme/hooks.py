"""Score layers of a model while it runs, through forward hooks.

``score_layers(model, layers, ...)`` attaches one forward hook per layer.
Each hook flattens the layer's output (or input) to [B, D], detaches it and
adds it, with the labels of the current batch, to that layer's streaming
accumulator: one per score, any streaming score of
:data:`torch_logme.SCORES` (LogME by default). The evaluation loop keeps
its shape:

    with score_layers(model, ["layer3", "fc"], num_classes=10) as scorer:
        for x, y in loader:
            scorer.labels(y)        # the labels of the next forward pass
            model(x)
    scores = scorer.compute()       # {"layer3": tensor(..), "fc": tensor(..)}

``scores=("logme", "h_score")`` scores every layer with both in the same
passes; ``compute()`` then returns ``{layer: {score: tensor}}``.

The accumulators live on the device of the features they receive, so the
features never leave that device; only the labels are moved to it.

A batch is all or nothing: each hook only keeps its layer's detached
features, and the accumulators take the batch once every layer has run and
every (layer, score) has passed its checks; an exception inside
``with scorer.batch(y):`` drops the batch and the scorer carries on.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import partial
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch import Tensor, nn

from . import registry
from .registry import DEFAULT_SCORE

Layer = Union[str, nn.Module]
ONS = ("output", "input")


def _as_list(layers: Union[Layer, Sequence[Layer]]) -> List[Layer]:
    if isinstance(layers, (str, nn.Module)):
        return [layers]
    return list(layers)


def resolve_layers(model: nn.Module, layers: Union[Layer, Sequence[Layer]]) -> Dict[str, nn.Module]:
    """Map each layer (a dotted name from ``model.named_modules()`` or a module) to name -> module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names_by_id = {id(m): name for name, m in model.named_modules()}
    out: Dict[str, nn.Module] = {}
    items = _as_list(layers)
    if not items:
        raise ValueError("layers is empty: give at least one module or dotted module name")
    for layer in items:
        if isinstance(layer, str):
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(
                    f"model has no submodule {layer!r}; names come from model.named_modules()"
                ) from None
            name = layer
        elif isinstance(layer, nn.Module):
            if id(layer) not in names_by_id:
                raise ValueError(f"{type(layer).__name__} module is not part of the model")
            module, name = layer, names_by_id[id(layer)]
        else:
            raise TypeError(f"a layer is a module name (str) or an nn.Module, got {type(layer).__name__}")
        if name in out:
            raise ValueError(f"layer {name!r} is given twice")
        out[name] = module
    return out


def checked_scores(scores: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """Check ``scores`` (one name or a sequence of names) and return them as a tuple.

    Raises:
        TypeError: ``scores`` is neither a str nor a sequence of names.
        ValueError: an unknown or repeated name, or none at all.

    A score that cannot stream is scored by a collecting accumulator, which
    keeps every batch's features (see ``torch_logme.collecting``).
    """
    if not isinstance(scores, (str, Sequence)):
        raise TypeError(
            f"scores must be a score name or a sequence (list, tuple) of names, got {type(scores).__name__}"
        )
    return registry.score_names(scores)


def _option_names(accepted: FrozenSet[str]) -> str:
    return ", ".join(sorted(accepted - {"device"}))


def _score_options(
    names: Tuple[str, ...], options: Mapping[str, Any], score_options: Optional[Mapping[str, Mapping[str, Any]]]
) -> Dict[str, Dict[str, Any]]:
    """Score name -> the keywords its accumulator gets: ``options`` for every score, then its own."""
    if score_options is None:
        score_options = {}
    if not isinstance(score_options, Mapping) or not all(isinstance(v, Mapping) for v in score_options.values()):
        raise TypeError(
            "score_options must map score names to dicts of options, e.g. {'gbc': {'min_variance': 1e-3}}"
        )
    unknown = [name for name in score_options if name not in names]
    if unknown:
        raise ValueError(f"score_options for scores not requested: {unknown}; requested: {list(names)}")
    # Under the caller's names: registry.accumulator maps num_classes to an accumulator's own name for it.
    accepted: Dict[str, FrozenSet[str]] = {
        name: frozenset(registry.accumulator_keywords(registry.get_score(name))) for name in names
    }
    for key in options:
        refusing = [name for name in names if key not in accepted[name]]
        if not refusing:
            continue
        if len(names) == 1:
            raise TypeError(f"{names[0]} takes no option {key!r}; its options: {_option_names(accepted[names[0]])}")
        taking = [name for name in names if name not in refusing]
        hint = (f"pass it for the scores that take it, e.g. score_options={{{taking[0]!r}: {{{key!r}: ...}}}}"
                if taking else "none of the chosen scores takes it")
        raise TypeError(
            f"option {key!r} goes to every score, but {', '.join(refusing)} "
            f"{'does' if len(refusing) == 1 else 'do'} not take it; {hint}"
        )
    out: Dict[str, Dict[str, Any]] = {}
    for name in names:
        own = score_options.get(name, {})
        for key in own:
            if key not in accepted[name]:
                raise TypeError(
                    f"score_options[{name!r}]: {name} takes no option {key!r}; its options: "
                    f"{_option_names(accepted[name])}"
                )
        # A score's own value wins over the shared one.
        out[name] = {**registry.shared_names(name, options), **registry.shared_names(name, own)}
    return out


def check_options(
    on: str,
    transform: Any,
    options: Mapping[str, Any],
    *,
    scores: Union[str, Sequence[str]] = DEFAULT_SCORE,
    score_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    widths: Iterable[int] = (1,),
) -> Dict[str, Dict[str, Any]]:
    """Raise now, not in the first forward pass, for a bad ``on``, ``transform``, score or accumulator option.

    Args:
        on, transform: as for :class:`LayerScorer`.
        options: keywords for every score's accumulator.
        scores: one score name or a sequence of names (see :func:`checked_scores`).
        score_options: score name -> keywords for that score's accumulator only.
        widths: the num_features values to validate the accumulators with.

    Returns:
        Score name -> the keywords its accumulator is built with (shared
        options first, its own over them; ``num_classes`` under the
        accumulator's own name for it).

    Every accumulator is built once without a device, which allocates
    nothing, so that its own checks run on every option.
    """
    if on not in ONS:
        raise ValueError(f"on must be one of {ONS}, got {on!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    own = score_options.values() if isinstance(score_options, Mapping) else ()
    if "device" in options or any(isinstance(o, Mapping) and "device" in o for o in own):
        raise TypeError("device is not an option of score_layers: accumulators follow their features' device")
    names = checked_scores(scores)
    kwargs = _score_options(names, options, score_options)
    for name in names:
        for width in widths:
            registry.accumulator(name, width, collect=True, **kwargs[name])
    return kwargs


def _flat_features(value: Any, transform: Optional[Callable[[Any], Tensor]], name: str) -> Tensor:
    """The hooked value as detached features [B, D]."""
    if transform is not None:
        value = transform(value)
    elif isinstance(value, (tuple, list)) and value:
        value = value[0]  # e.g. (output, hidden) of recurrent layers
    if not isinstance(value, Tensor):
        raise TypeError(
            f"layer {name!r} gave a {type(value).__name__}, not a tensor; pass transform= to pick the features"
        )
    if value.dim() == 0:
        raise ValueError(f"layer {name!r} gave a 0-dim tensor; expected a batch [B, ...]")
    return value.detach().reshape(value.shape[0], -1)


class LayerScorer:
    """Forward hooks feeding each of one or more layers into one streaming accumulator per score.

    Args:
        model: the network; layers are looked up in ``model.named_modules()``.
        layers: a module or dotted name, or a sequence of them.
        scores: a score name of :data:`torch_logme.SCORES` (default
            ``"logme"``), or a sequence of names. Every score must stream
            (LEEP does not). A score that reads source-class predictions
            (``SCORES[name].input == "probs"``, e.g. NCE) takes the hooked
            value as logits or probabilities [B, Cs]: hook the layer that
            returns them.
        on: ``"output"`` scores what a layer returns, ``"input"`` its first
            positional input (e.g. the input of the classifier head).
        num_features: D per layer (an int for all, or a name -> int mapping);
            None reads it from the first batch.
        transform: optional callable applied to the hooked value before it is
            flattened, e.g. global average pooling of [B, C, H, W] maps.
        score_options: score name -> keywords for that score's accumulator
            only, e.g. ``{"transrate": {"eps": 1e-3}}``; they win over
            ``**options``.
        **options: keywords for every score's accumulator. With LogME alone:
            ``num_classes``, ``regression``, ``num_targets``, ``dtype``,
            ``check_inputs``, ``sync_on_compute``, ``max_iter``, ``tol``,
            ``method``, ``legacy_evidence``. With several scores, each must
            be an option of every one (``num_classes``, ``dtype``,
            ``check_inputs``, ``sync_on_compute``); the rest go in
            ``score_options``. ``num_classes`` reaches an accumulator that
            calls it ``num_target_classes`` (NCE) under that name.
            ``device`` is not accepted: each accumulator lives on the device
            its features come from.

    Every score and option is checked when the scorer is made, before any
    forward pass. Call :meth:`labels` (or use :meth:`batch`) before each
    forward pass; each hooked layer takes those labels once.

    A batch is taken by every layer and every score, or by none: a hook
    only keeps its layer's detached features [B, D] (which exist anyway
    until the forward pass ends) and the accumulators take them after every
    (layer, score) passed the checks its update runs (widths, finite values,
    label range): with :meth:`batch`, when the block exits without an
    exception; with :meth:`labels`, when the last layer has run. On an
    exception (the model's, a hook's, a rejected batch) the batch is
    dropped and the next :meth:`batch` or :meth:`labels` works as usual.
    Not covered, as for the accumulators: a failure of the arithmetic
    itself (out of memory) after some accumulators took the batch; the
    scorer then raises until :meth:`reset`. :meth:`remove`
    (or leaving the ``with`` block) detaches the hooks; :meth:`compute`
    still works after.

    With one score name, :meth:`compute` returns ``{layer: tensor}`` and
    ``accumulators`` is ``{layer: accumulator}``; with a sequence of names
    (even of one), they are ``{layer: {score: tensor}}`` and
    ``{layer: {score: accumulator}}``. A layer's entry in ``accumulators``
    is None until its first batch.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[Layer, Sequence[Layer]],
        *,
        scores: Union[str, Sequence[str]] = DEFAULT_SCORE,
        on: str = "output",
        num_features: Union[int, Mapping[str, int], None] = None,
        transform: Optional[Callable[[Any], Tensor]] = None,
        score_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        **options: Any,
    ) -> None:
        if isinstance(num_features, Mapping):
            widths = list(num_features.values()) or [1]
        else:
            widths = [1 if num_features is None else num_features]
        self._kwargs = check_options(
            on, transform, options, scores=scores, score_options=score_options, widths=widths
        )
        self.scores: Tuple[str, ...] = tuple(self._kwargs)
        self.nested = not isinstance(scores, str)  # results keyed by score too
        self.layers = resolve_layers(model, layers)
        if isinstance(num_features, Mapping):
            unknown = set(num_features) - set(self.layers)
            if unknown:
                raise ValueError(f"num_features names layers that are not scored: {sorted(unknown)}")
        self.on = on
        self.transform = transform
        self.enabled = True  # False: the hooks let forward passes through unscored
        self._num_features = num_features
        # layer -> score -> accumulator, made at the layer's first batch (D and device come from it)
        self._accs: Dict[str, Optional[Dict[str, Any]]] = {name: None for name in self.layers}
        self._targets: Any = None
        self._pending: set = set()  # layers that have not yet taken the current labels
        # Layer -> its features of the current batch, kept until the batch is taken or dropped.
        self._staged: Dict[str, Tensor] = {}
        self._in_batch = False  # inside batch(): the block's exit takes the batch
        self._torn: Optional[str] = None  # why some accumulators took a batch others did not
        self._handles = [
            module.register_forward_hook(partial(self._hook, name)) for name, module in self.layers.items()
        ]

    @property
    def accumulators(self) -> Dict[str, Any]:
        """Layer -> its accumulator (one score name) or {score: accumulator} (a sequence of names).

        A layer's entry is None until its first batch.
        """
        if self.nested:
            return {name: None if accs is None else dict(accs) for name, accs in self._accs.items()}
        (score,) = self.scores
        return {name: None if accs is None else accs[score] for name, accs in self._accs.items()}

    # -- feeding ---------------------------------------------------------------
    def labels(self, targets: Any) -> None:
        """Set the labels [B] (or regression targets [B] / [B, K]) of the next forward pass."""
        self._check_consumed("labels()")
        self._targets = targets
        self._pending = set(self.layers)
        self._staged = {}

    @contextmanager
    def batch(self, targets: Any) -> Iterator["LayerScorer"]:
        """``with scorer.batch(y): model(x)``: labels for this block; every layer must run in it.

        The accumulators take the batch when the block exits without an
        exception; on an exception nothing is taken and the scorer is
        ready for the next batch.
        """
        self.labels(targets)
        self._in_batch = True
        try:
            yield self
            self._check_consumed("the end of batch()")
            self._commit()
        finally:
            self._in_batch = False
            self._drop()  # after _commit there is nothing left; after an exception this drops the batch

    def _drop(self) -> None:
        """Forget the current batch: labels, features and which layers are still to run."""
        self._targets, self._pending, self._staged = None, set(), {}

    def _check_torn(self) -> None:
        if self._torn is not None:
            raise RuntimeError(f"{self._torn}; call reset() before scoring on")

    def _check_consumed(self, where: str) -> None:
        self._check_torn()
        if self._pending:
            raise RuntimeError(
                f"layers {sorted(self._pending)} did not run since the last labels() (checked at {where}); "
                "each scored layer must run once per forward pass"
            )

    def _hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.enabled:
            return
        if name not in self._pending:
            raise RuntimeError(
                f"layer {name!r} ran without new labels: call scorer.labels(y) before each forward pass "
                "(or set scorer.enabled = False for passes that should not be scored)"
            )
        if self.on == "input":
            if not args:
                raise TypeError(f"layer {name!r} got no positional input; use on='output' on the layer before")
            value = args[0]
        else:
            value = output
        try:
            # No autograd graph, and normal (not inference) tensors, so that the
            # sums can be reset and updated after an inference_mode() pass.
            with torch.no_grad(), torch.inference_mode(False):
                self._staged[name] = _flat_features(value, self.transform, name)
            self._pending.discard(name)
            if not self._pending and not self._in_batch:
                self._commit()  # labels(): no block to wait for, the last layer has run
        except BaseException:
            if not self._in_batch:  # batch() drops it on its way out
                self._drop()
            raise

    def _new_accumulators(self, name: str, features: Tensor) -> Dict[str, Any]:
        d = self._num_features
        if isinstance(d, Mapping):
            d = d.get(name)
        if d is None:
            d = features.shape[1]
        return {
            score: registry.accumulator(score, d, collect=True, device=features.device, **self._kwargs[score])
            for score in self.scores
        }

    def _commit(self) -> None:
        """Every staged layer's features into each of its accumulators, or into none."""
        staged, targets = self._staged, self._targets
        self._drop()  # the batch is taken or dropped here, never twice
        with torch.no_grad(), torch.inference_mode(False):
            # New layers' accumulators are installed only with the batch: a
            # rejected first batch leaves the layer's entry None, as before it.
            accs = {name: self._accs[name] or self._new_accumulators(name, f) for name, f in staged.items()}
            # Every accumulator's own checks before any sum is touched; the updates check
            # again, but reading back B x D values costs little next to their D x D sums.
            for name, features in staged.items():
                for acc in accs[name].values():
                    acc.check_batch(features, targets, features.device)
            taken: List[str] = []
            for name, features in staged.items():
                for score, acc in accs[name].items():
                    try:
                        acc.update(features, targets)
                    except BaseException:
                        if taken:
                            # Undoing would need a copy of every sum per batch (about half an update's
                            # time at D = 2048); the checks above make this the out-of-memory case only.
                            self._torn = f"a batch was taken by {', '.join(taken)} only"
                        raise
                    taken.append(f"{name}/{score}")
                self._accs[name] = accs[name]

    # -- results -----------------------------------------------------------------
    def compute(self, reduction: str = "mean") -> Dict[str, Any]:
        """The scores of every batch so far.

        Args:
            reduction: "mean" (the score), or, for scores whose accumulator
                takes it (LogME), "sum" or "none" (per class, [C]).

        Returns:
            ``{layer: tensor}`` (one score name) or ``{layer: {score: tensor}}``
            (a sequence of names); tensors are 0-dim, or [C] for "none".
        """
        self._check_consumed("compute()")
        missing = [name for name, accs in self._accs.items() if accs is None]
        if missing:
            raise RuntimeError(f"layers {missing} have not run yet: no features to score")
        ready: Dict[str, Dict[str, Any]] = {name: accs for name, accs in self._accs.items() if accs is not None}
        kwargs: Dict[str, Any] = {}
        if reduction != "mean":
            some = next(iter(ready.values()))
            single = [s for s in self.scores if "reduction" not in inspect.signature(some[s].compute).parameters]
            if single:
                raise ValueError(
                    f"reduction={reduction!r} needs per-class scores, but {', '.join(single)} "
                    f"{'gives' if len(single) == 1 else 'give'} one number per layer; use reduction='mean'"
                )
            kwargs["reduction"] = reduction
        out: Dict[str, Dict[str, Tensor]] = {
            name: {score: acc.compute(**kwargs) for score, acc in accs.items()} for name, accs in ready.items()
        }
        if self.nested:
            return out
        (score,) = self.scores
        return {name: by_score[score] for name, by_score in out.items()}

    def reset(self) -> None:
        """Forget every batch (keeps the hooks, the sizes and the devices)."""
        for accs in self._accs.values():
            for acc in (accs or {}).values():
                acc.reset()
        self._drop()
        self._torn = None

    def remove(self) -> None:
        """Detach the hooks from the model (idempotent); the scores stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LayerScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def score_layers(
    model: nn.Module,
    layers: Union[Layer, Sequence[Layer]],
    *,
    scores: Union[str, Sequence[str]] = DEFAULT_SCORE,
    **kwargs: Any,
) -> LayerScorer:
    """Hook ``layers`` of ``model`` for scoring; see :class:`LayerScorer` for the options.

    Args:
        model: the network.
        layers: a module or dotted name, or a sequence of them.
        scores: a streaming score's name (default ``"logme"``): ``compute()``
            gives ``{layer: tensor}``; or a sequence of names:
            ``{layer: {score: tensor}}``.
        **kwargs: ``on``, ``num_features``, ``transform``, ``score_options``
            and the accumulators' options, as for :class:`LayerScorer`.

    Example (the three added lines are marked)::

        with score_layers(model, "fc", on="input", num_classes=10) as scorer:  # +1
            for x, y in loader:
                scorer.labels(y)                                            # +2
                model(x)
        score = scorer.compute()["fc"]                                      # +3

    With ``scores=("logme", "gbc")``, ``scorer.compute()["fc"]["gbc"]`` is
    GBC of the same features, from the same forward passes.
    """
    return LayerScorer(model, layers, scores=scores, **kwargs)
