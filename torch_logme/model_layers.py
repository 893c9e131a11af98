"""Which layers of a candidate model are scored, and how their values become features [B, D].

A layer is named by a *label*: ``"layer3"`` scores what the module
``layer3`` returns, ``"fc:input"`` what the module ``fc`` receives (its first
positional input), and ``"output"`` what the whole model returns. Labels are
what :func:`torch_logme.rank_models` reports, and each may be given back as a
layer to score.

The default layer is the input of the model's classifier: the last
``nn.Linear`` in ``model.modules()`` order, hooked on its input, as the
published LogME code does for torchvision models (``model.fc`` there). For a
network whose head is not its last ``nn.Linear`` (a projection after the
classifier, say), name the layer.

A model may declare its own defaults, as the model-zoo adapters
(:mod:`torch_logme.zoo`) do, with plain attributes:

- ``torch_logme_default_layer``: the layer (or list of layers) scored when
  ``layers`` is None, e.g. ``"output"`` for a Hugging Face encoder (its
  last hidden state);
- ``torch_logme_blocks``: what ``layers="all"`` scores when ``blocks`` is
  None, e.g. the encoder's blocks;
- ``torch_logme_prepare``: a callable applied to each batch's inputs before
  they move to the device (a tokenizer for texts, a transform for images).

Pooling (``pool=``) turns a layer's value into features [B, D]:

- ``"avg"`` (default): [B, D] as is; [B, C, H, W] (and any [B, C, *spatial])
  averaged over the spatial positions (global average pooling);
  [B, T, D] averaged over the tokens, counting only those the batch's
  ``attention_mask`` [B, T] keeps when the inputs are a dict that holds one.
- ``"cls"``: token 0 of [B, T, D] (a CLS token); other shapes as ``"avg"``.
- ``"flatten"``: every value reshaped to [B, everything else].
- a callable ``pool(value) -> [B, D]``.

Half-precision values (under ``autocast=``) are pooled and kept in float32;
the scores' statistics are float64 whatever the features' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "LayerSpec", "POOLS", "resolve", "default_layer", "pool_value", "check_pool", "known_width",
    "DEFAULT_LAYER_ATTR", "BLOCKS_ATTR", "PREPARE_ATTR",
]

POOLS = ("avg", "cls", "flatten")
ONS = ("output", "input")
#: The label of the whole model's return value.
OUTPUT = "output"
#: The attributes through which a model declares its default layer, its blocks and its input preparation.
DEFAULT_LAYER_ATTR = "torch_logme_default_layer"
BLOCKS_ATTR = "torch_logme_blocks"
PREPARE_ATTR = "torch_logme_prepare"


@dataclass(frozen=True)
class LayerSpec:
    """One scored layer: its label, the module's dotted name ("" for the model) and what is hooked."""

    label: str
    name: str
    on: str

    @staticmethod
    def make(name: str, on: str) -> "LayerSpec":
        if name == "":
            if on == "input":
                raise ValueError("the model's own input cannot be scored; name a layer")
            return LayerSpec(OUTPUT, "", "output")
        return LayerSpec(name if on == "output" else f"{name}:{on}", name, on)


def check_pool(pool: Any) -> Union[str, Callable[[Tensor], Tensor]]:
    """``pool`` if it is one of :data:`POOLS` or a callable; ValueError / TypeError otherwise."""
    if isinstance(pool, str):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS} or a callable value -> [B, D], got {pool!r}")
        return pool
    if not callable(pool):
        raise TypeError(f"pool must be one of {POOLS} or a callable value -> [B, D], got {type(pool).__name__}")
    return pool


def default_layer(model: nn.Module, model_name: str) -> LayerSpec:
    """The input of the last ``nn.Linear`` of ``model`` (its classifier, for most networks)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"model {model_name!r} has no nn.Linear, so no classifier whose input is the default layer; "
            "pass layers= (a module name, 'name:input', or a list of them)"
        )
    return LayerSpec.make(last, "input")


def _module_name(model: nn.Module, module: nn.Module, model_name: str) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"model {model_name!r}: the {type(module).__name__} module given as a layer is not part of it")


def _check_name(model: nn.Module, name: str, model_name: str) -> None:
    if name == "":
        return
    try:
        model.get_submodule(name)
    except AttributeError:
        close = [n for n, _ in model.named_modules() if n and (name in n or n in name)][:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"model {model_name!r} has no layer {name!r}; names come from model.named_modules(){hint}"
        ) from None


def _one(model: nn.Module, layer: Any, model_name: str) -> LayerSpec:
    """One layer given as a label, a module, or a (layer, "input"|"output") pair."""
    on = "output"
    if isinstance(layer, tuple):
        if not _is_pair(layer):
            raise ValueError(f"a layer given as a pair is (name or module, 'input' or 'output'), got {layer!r}")
        layer, on = layer
    if isinstance(layer, nn.Module):
        name = _module_name(model, layer, model_name)
    elif isinstance(layer, str):
        name = layer
        if layer == OUTPUT and not _has(model, OUTPUT):
            name = ""
        elif ":" in layer:
            name, _, on = layer.rpartition(":")
            if on not in ONS:
                raise ValueError(f"layer {layer!r}: the part after ':' must be 'input' or 'output', got {on!r}")
    else:
        raise TypeError(
            f"a layer is a module name (str, 'name:input' for its input), an nn.Module, or a (layer, 'input') "
            f"pair, got {type(layer).__name__}"
        )
    _check_name(model, name, model_name)
    return LayerSpec.make(name, on)


def _is_pair(layer: Any) -> bool:
    """Whether ``layer`` is a (layer, "input"|"output") pair rather than a tuple of layers."""
    return (isinstance(layer, tuple) and len(layer) == 2 and isinstance(layer[0], (str, nn.Module))
            and isinstance(layer[1], str) and layer[1] in ONS)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _blocks(model: nn.Module, blocks: Any, model_name: str) -> List[LayerSpec]:
    """The layers ``blocks`` names: a container's name (its children), a list of layers, or module types."""
    if blocks is None:
        blocks = getattr(model, BLOCKS_ATTR, None)
    if blocks is None:
        raise ValueError(
            f"model {model_name!r}: layers='all' needs blocks=: a container's name (e.g. 'encoder.layer': each "
            "of its children), a list of layer names, or a module type (e.g. a block class: every module of "
            "that type)"
        )
    if isinstance(blocks, type) or (isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks)):
        found = [LayerSpec.make(n, "output") for n, m in model.named_modules() if n and isinstance(m, blocks)]
        if not found:
            raise ValueError(f"model {model_name!r} has no module of type {blocks!r} to score")
        return found
    if isinstance(blocks, str):
        _check_name(model, blocks, model_name)
        container = model.get_submodule(blocks)
        prefix = f"{blocks}." if blocks else ""
        children = [LayerSpec.make(prefix + n, "output") for n, _ in container.named_children()]
        if not children:
            raise ValueError(f"model {model_name!r}: {blocks!r} has no children to score")
        return children
    if isinstance(blocks, Sequence):
        return [_one(model, b, model_name) for b in blocks]
    raise TypeError(
        f"blocks must be a container's name, a list of layers or a module type, got {type(blocks).__name__}"
    )


def resolve(model: nn.Module, layers: Any, blocks: Any, model_name: str) -> List[LayerSpec]:
    """The layers of ``model`` to score, in order, checked against the model; ValueError naming what is wrong."""
    if layers is None and getattr(model, DEFAULT_LAYER_ATTR, None) is not None:
        layers = getattr(model, DEFAULT_LAYER_ATTR)
    if layers is None:
        specs = [default_layer(model, model_name)]
    elif isinstance(layers, str) and layers == "all":
        specs = _blocks(model, blocks, model_name)
    elif isinstance(layers, (str, nn.Module)) or _is_pair(layers):
        specs = [_one(model, layers, model_name)]
    elif isinstance(layers, Sequence):
        specs = [_one(model, layer, model_name) for layer in layers]
    else:
        raise TypeError(
            f"layers must be None (the classifier's input), a layer, a list of layers, or 'all' with blocks=, "
            f"got {type(layers).__name__}"
        )
    if not specs:
        raise ValueError(f"model {model_name!r}: layers is empty; give at least one layer")
    labels = [s.label for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"model {model_name!r}: layers are given twice: {repeated}")
    return specs


def per_model(value: Any, names: Sequence[str], what: str) -> Dict[str, Any]:
    """A per-model option (a mapping name -> value, or one value for all) as name -> value.

    Raises ValueError for a mapping that names models not ranked. Models
    a mapping leaves out get None (the default).
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(names))
        if unknown:
            raise ValueError(f"{what} names models that are not ranked: {unknown}; the models: {list(names)}")
        return {name: value.get(name) for name in names}
    return {name: value for name in names}


def known_width(model: nn.Module, spec: LayerSpec) -> Optional[int]:
    """D of the layer's features when the module says it before any pass (Linear, Conv, norms); else None."""
    if spec.name == "":
        return None
    module = model.get_submodule(spec.name)
    if isinstance(module, nn.Linear):
        return module.in_features if spec.on == "input" else module.out_features
    if spec.on == "input":
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return None


def _tensor(value: Any, label: str) -> Tensor:
    """The tensor in a layer's value: itself, the first of a tuple / list, or the first value of a dict."""
    if isinstance(value, Mapping) and value:  # e.g. a Hugging Face ModelOutput
        value = next(iter(value.values()))
    elif isinstance(value, (tuple, list)) and value:  # e.g. (output, hidden) of recurrent layers
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"layer {label!r} gave a {type(value).__name__}, not a tensor; pass pool= a callable that picks "
            "the features"
        )
    if value.dim() == 0:
        raise ValueError(f"layer {label!r} gave a 0-dim tensor; expected a batch [B, ...]")
    return value


def _pool_dtype(value: Tensor) -> Optional[torch.dtype]:
    # Sums of half-precision values lose digits: pool them in float32.
    return torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else None


def pool_value(value: Any, pool: Union[str, Callable[[Tensor], Tensor]], label: str,
               mask: Optional[Tensor] = None) -> Tensor:
    """A layer's value as features [B, D] by the rule ``pool`` (see the module's docstring).

    Args:
        value: the hooked value: [B, D], [B, T, D], [B, C, H, W] ... (or a
            tuple / dict holding one first).
        pool: one of :data:`POOLS`, or a callable value -> [B, D].
        label: the layer's label, for messages.
        mask: the batch's attention mask [B, T] (nonzero: a real token), or None.
    """
    if callable(pool):
        out = pool(value)
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"layer {label!r}: pool must return features [B, D], got {got}")
        return out.float() if _pool_dtype(out) is not None else out
    x = _tensor(value, label)
    dtype = _pool_dtype(x)
    if pool == "flatten" or x.dim() == 1:
        out = x.reshape(x.shape[0], -1)
    elif x.dim() == 2:
        out = x
    elif x.dim() == 3:
        if pool == "cls":
            out = x[:, 0]
        elif mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"layer {label!r}: its tokens [B, T] = {tuple(x.shape[:2])} do not match the attention_mask "
                    f"{tuple(mask.shape)}; pool it with pool='cls', 'flatten' or a callable"
                )
            weights = (mask != 0).to(dtype or x.dtype).unsqueeze(-1)
            total = (x * weights).sum(1, dtype=dtype)
            out = total / weights.sum(1, dtype=dtype).clamp_min(1)
        else:
            out = x.mean(1, dtype=dtype)
    else:
        out = x.mean(tuple(range(2, x.dim())), dtype=dtype)
    return out.float() if _pool_dtype(out) is not None else out


def probabilities(value: Any, label: str, kind: str) -> Tensor:
    """The model's return value as source-class probabilities [B, Cs] for LEEP / NCE.

    ``kind``: "logits" (softmax taken, in float32) or "probs" (as is).
    """
    if not isinstance(value, Tensor) and hasattr(value, "logits"):  # a Hugging Face output
        value = value.logits
    x = _tensor(value, label)
    if x.dim() != 2:
        raise ValueError(
            f"the model's output {tuple(x.shape)} is not source-class scores [B, Cs]; LEEP and NCE read "
            "the predictions of the model's source head"
        )
    return x.float().softmax(1) if kind == "logits" else x


def split_batch(batch: Any) -> Tuple[Any, Any]:
    """(inputs, labels) of a batch: a pair, or a dict with its labels under "labels" / "label"."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label"):
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        raise ValueError(
            f"a batch given as a dict must hold its labels under 'labels' or 'label'; its keys: {list(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch of data must be (inputs, labels) or a dict with 'labels', got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )
