"""Score layers of a model with LogME while it runs, through forward hooks.

``score_layers(model, layers, ...)`` attaches one forward hook per layer.
Each hook flattens the layer's output (or input) to [B, D], detaches it and
adds it, with the labels of the current batch, to that layer's
:class:`~torch_logme.LogMEAccumulator`. The evaluation loop keeps its shape:

    with score_layers(model, ["layer3", "fc"], num_classes=10) as scorer:
        for x, y in loader:
            scorer.labels(y)        # the labels of the next forward pass
            model(x)
    scores = scorer.compute()       # {"layer3": tensor(..), "fc": tensor(..)}

The accumulators live on the device of the features they receive, so the
features never leave that device; only the labels are moved to it.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .streaming import LogMEAccumulator

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


def check_options(on: str, transform: Any, options: Mapping[str, Any]) -> None:
    """Raise now, not in the first forward pass, for a bad ``on``, ``transform`` or accumulator option."""
    if on not in ONS:
        raise ValueError(f"on must be one of {ONS}, got {on!r}")
    if "device" in options:
        raise TypeError("device is not an option of score_layers: accumulators follow their features' device")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    LogMEAccumulator(1, **options)  # allocates nothing: device is None


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
    """Forward hooks feeding one or more layers into one LogMEAccumulator each.

    Args:
        model: the network; layers are looked up in ``model.named_modules()``.
        layers: a module or dotted name, or a sequence of them.
        on: ``"output"`` scores what a layer returns, ``"input"`` its first
            positional input (e.g. the input of the classifier head).
        num_features: D per layer (an int for all, or a name -> int mapping);
            None reads it from the first batch.
        transform: optional callable applied to the hooked value before it is
            flattened, e.g. global average pooling of [B, C, H, W] maps.
        **options: passed to every :class:`LogMEAccumulator`: ``num_classes``,
            ``regression``, ``num_targets``, ``dtype``, ``check_inputs``,
            ``sync_on_compute``, ``max_iter``, ``tol``, ``method``,
            ``legacy_evidence``. ``device`` is not accepted: each accumulator
            lives on the device its features come from.

    Call :meth:`labels` (or use :meth:`batch`) before each forward pass; each
    hooked layer takes those labels once. :meth:`remove` (or leaving the
    ``with`` block) detaches the hooks; :meth:`compute` still works after.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[Layer, Sequence[Layer]],
        *,
        on: str = "output",
        num_features: Union[int, Mapping[str, int], None] = None,
        transform: Optional[Callable[[Any], Tensor]] = None,
        **options: Any,
    ) -> None:
        check_options(on, transform, options)
        self.layers = resolve_layers(model, layers)
        if isinstance(num_features, Mapping):
            unknown = set(num_features) - set(self.layers)
            if unknown:
                raise ValueError(f"num_features names layers that are not scored: {sorted(unknown)}")
        self.on = on
        self.transform = transform
        self.enabled = True  # False: the hooks let forward passes through unscored
        self._num_features = num_features
        self._options = options
        self.accumulators: Dict[str, Optional[LogMEAccumulator]] = {name: None for name in self.layers}
        self._targets: Any = None
        self._pending: set = set()  # layers that have not yet taken the current labels
        self._handles = [
            module.register_forward_hook(partial(self._hook, name)) for name, module in self.layers.items()
        ]

    # -- feeding ---------------------------------------------------------------
    def labels(self, targets: Any) -> None:
        """Set the labels [B] (or regression targets [B] / [B, K]) of the next forward pass."""
        self._check_consumed("labels()")
        self._targets = targets
        self._pending = set(self.layers)

    @contextmanager
    def batch(self, targets: Any) -> Iterator["LayerScorer"]:
        """``with scorer.batch(y): model(x)``: labels for this block; every layer must run in it."""
        self.labels(targets)
        yield self
        self._check_consumed("the end of batch()")

    def _check_consumed(self, where: str) -> None:
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
        # No autograd graph, and normal (not inference) tensors, so that the
        # sums can be reset and updated after an inference_mode() pass.
        with torch.no_grad(), torch.inference_mode(False):
            features = _flat_features(value, self.transform, name)
            acc = self.accumulators[name]
            if acc is None:
                d = self._num_features
                if isinstance(d, Mapping):
                    d = d.get(name)
                if d is None:
                    d = features.shape[1]
                acc = LogMEAccumulator(d, device=features.device, **self._options)
                self.accumulators[name] = acc
            acc.update(features, self._targets)
        self._pending.discard(name)
        if not self._pending:
            self._targets = None  # every layer has its copy: do not keep the batch alive

    # -- results -----------------------------------------------------------------
    def compute(self, reduction: str = "mean") -> Dict[str, Tensor]:
        """Layer name -> LogME score of every batch so far (0-dim, or [C] for "none")."""
        self._check_consumed("compute()")
        missing = [name for name, acc in self.accumulators.items() if acc is None]
        if missing:
            raise RuntimeError(f"layers {missing} have not run yet: no features to score")
        return {name: acc.compute(reduction=reduction) for name, acc in self.accumulators.items()}

    def reset(self) -> None:
        """Forget every batch (keeps the hooks, the sizes and the devices)."""
        for acc in self.accumulators.values():
            if acc is not None:
                acc.reset()
        self._targets, self._pending = None, set()

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
    model: nn.Module, layers: Union[Layer, Sequence[Layer]], **kwargs: Any
) -> LayerScorer:
    """Hook ``layers`` of ``model`` for LogME scoring; see :class:`LayerScorer` for the options.

    Example (the three added lines are marked)::

        with score_layers(model, "fc", on="input", num_classes=10) as scorer:  # +1
            for x, y in loader:
                scorer.labels(y)                                            # +2
                model(x)
        score = scorer.compute()["fc"]                                      # +3
    """
    return LayerScorer(model, layers, **kwargs)
