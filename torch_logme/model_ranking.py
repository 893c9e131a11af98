"""Rank candidate models on a labelled data set: one forward pass per model, every layer and score streamed.

``torch_logme.rank_models(models, data, ...)`` with models (not features)
comes here. For each candidate in turn it builds the model (when given as a
zero-argument callable), hooks the layers to score (:mod:`torch_logme.hooks`,
one :class:`~torch_logme.hooks.LayerScorer` per layer), runs the data
through it once in ``eval()`` mode under ``torch.inference_mode``, and
reads every (layer, score) from accumulators that lived on the model's
device all along. Then it frees the model and goes to the next. Scores that
cannot stream keep their features (on the device), after a check of the
memory that takes. The result, :class:`ModelRanking`, is a
:class:`~torch_logme.ranking.Ranking` that also holds every layer's scores,
the layer chosen per model, the time and the peak memory.

Where layers and pooling are defined: :mod:`torch_logme.model_layers`.
The feature cache: :mod:`torch_logme.feature_cache`. The result and the
memory measurement: :mod:`torch_logme.model_result`.

Model zoos: a model given as a string "<zoo>:<name>" (e.g. "timm:resnet50")
is built by the adapter registered for "<zoo>" with :func:`register_adapter`.
:mod:`torch_logme.zoo` registers "timm", "hf" and "torchvision"; each imports
its package only when a model of that zoo is built.
"""
from __future__ import annotations

import collections.abc
import gc
import hashlib
import logging
import math
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import hooks, model_layers, ranking, registry
from ._options import compute_options
from ._pool import combine_terms, pooled_note
from ._validators import boolean, one_of
from .feature_cache import DataPrint, FeatureCache, data_fingerprint, model_fingerprint
from .model_layers import OUTPUT, LayerSpec
from .model_result import ModelEntry, ModelRanking, PeakMemory, mib
from .registry import DEFAULT_SCORE
from .streaming import _default_device

__all__ = [
    "rank_candidate_models", "ModelRanking", "ModelEntry", "register_adapter", "MODEL_ADAPTERS",
    "AGGREGATES", "is_models", "CollectLimitError",
]

logger = logging.getLogger(__name__)

AGGREGATES = ("best", "last", "mean")
MODEL_OUTPUTS = ("logits", "probs")

#: Above this many bytes of kept features (scores that cannot stream) a warning says so before the pass.
WARN_COLLECT_BYTES = 1 << 30
#: The default of ``max_collect_bytes``.
DEFAULT_MAX_COLLECT_BYTES = 8 << 30

#: Model zoo adapters by prefix: "timm" -> build(name) -> nn.Module (torch_logme.zoo registers its three).
MODEL_ADAPTERS: Dict[str, Callable[[str], nn.Module]] = {}


def register_adapter(prefix: str, build: Callable[[str], nn.Module]) -> None:
    """Let models be given as "<prefix>:<name>", built by ``build(name)`` when their turn comes."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"an adapter prefix is a name such as 'timm', got {prefix!r}")
    if not callable(build):
        raise TypeError(f"build must be callable name -> nn.Module, got {type(build).__name__}")
    MODEL_ADAPTERS[prefix] = build


class CollectLimitError(ValueError):
    """The features that scores which cannot stream would keep exceed ``max_collect_bytes``."""


def _is_candidate(value: Any) -> bool:
    return isinstance(value, (nn.Module, str)) or (callable(value) and not isinstance(value, (Tensor, np.ndarray)))


def is_models(candidates: Any) -> bool:
    """Whether ``rank_models``' first argument holds models (modules, builders, zoo names), not features.

    Raises TypeError when it mixes models and features.
    """
    if isinstance(candidates, Mapping):
        values = list(candidates.values())
    elif isinstance(candidates, (list, tuple)):
        values = list(candidates)
    else:
        return False
    kinds = [_is_candidate(v) for v in values]
    if any(kinds) and not all(kinds):
        raise TypeError(
            "rank_models takes either models (nn.Module, a zero-argument callable building one, or a zoo name) "
            "or features (arrays) for every candidate, not a mix"
        )
    return bool(kinds) and all(kinds)


def _builder(name: str, value: Any) -> Tuple[Callable[[], nn.Module], bool]:
    """(build, owned): how to get the model, and whether this module made it (and so frees it)."""
    if isinstance(value, nn.Module):
        return (lambda: value), False
    if isinstance(value, str):
        prefix, sep, ident = value.partition(":")
        if not sep or prefix not in MODEL_ADAPTERS:
            known = ", ".join(f"{p}:" for p in MODEL_ADAPTERS) or "none"
            raise ValueError(
                f"model {name!r}: {value!r} is not a model; a model given by name is '<zoo>:<name>' with a "
                f"registered adapter (registered: {known}); otherwise pass an nn.Module or a zero-argument "
                "callable that builds one"
            )
        build = MODEL_ADAPTERS[prefix]
        return (lambda: build(ident)), True
    return value, True


def _build(name: str, build: Callable[[], nn.Module]) -> nn.Module:
    model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: its builder returned a {type(model).__name__}, not an nn.Module")
    return model


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(recurse=True), *model.buffers(recurse=True)][:1]:
        return tensor.device
    return torch.device("cpu")


def _model_itemsize(model: nn.Module) -> int:
    # Pooled features are float32, or float64 for a float64 model (model_layers).
    for tensor in model.parameters():
        return 8 if tensor.dtype == torch.float64 else 4
    return 4


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):  # e.g. a tokenizer's output for a Hugging Face model
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _distributed() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fewest_batches(batches: int) -> int:
    """The fewest batches any rank saw (this rank's count outside torch.distributed).

    Every rank decides together whether to go on: a rank without a batch
    that raised alone would leave the others waiting in the sums' collectives.
    """
    if _distributed()[1] == 1:
        return batches
    count = torch.tensor([batches], dtype=torch.int64, device=_default_device())
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    return int(count.item())


# -- one model's pass --------------------------------------------------------------------------------------

@dataclass
class _Settings:
    """The checked options of one call, shared by every model's pass."""

    feature_scores: Tuple[str, ...]
    probs_scores: Tuple[str, ...]
    options: Dict[str, Dict[str, Any]]  # score -> its accumulator's keywords (hooks.check_options)
    pool: Any
    autocast: Optional[torch.dtype]
    model_output: str
    max_collect_bytes: Optional[int]
    progress: bool
    rank: int
    world: int

    def scores_of(self, key: str) -> Tuple[str, ...]:
        return self.probs_scores if key.endswith(".probs") else self.feature_scores


def _keys(specs: Sequence[LayerSpec], settings: _Settings) -> List[Tuple[str, LayerSpec]]:
    """(key, spec) of every stream of features: one per feature layer, plus "output.probs" for LEEP / NCE."""
    keys = [(spec.label, spec) for spec in specs] if settings.feature_scores else []
    if settings.probs_scores:
        keys.append((f"{OUTPUT}.probs", LayerSpec.make("", "output")))
    return keys


class _Collected:
    """Bytes of features that the scores which cannot stream keep, checked against the limit as they grow."""

    def __init__(self, model: str, settings: _Settings, counts: Dict[str, int], itemsize: int) -> None:
        self.model, self.settings, self.counts, self.itemsize = model, settings, counts, itemsize
        self.bytes = 0
        self.widths: Dict[str, Optional[int]] = {}
        self.num_samples: Optional[int] = None
        self.estimated = True

    def check(self, total: int, what: str) -> None:
        limit = self.settings.max_collect_bytes
        if limit is not None and total > limit:
            raise CollectLimitError(
                f"model {self.model!r}: the scores that cannot stream "
                f"({', '.join(sorted({s for k in self.counts for s in self._collecting(k)}))}) {what} "
                f"{total / 2**30:.2f} GiB of features, over max_collect_bytes={limit} ({limit / 2**30:.2f} GiB); "
                "raise max_collect_bytes (None: no limit), score fewer layers, or choose scores that stream"
            )

    def _collecting(self, key: str) -> List[str]:
        return [s for s in self.settings.scores_of(key) if not registry.SCORES[s].streams]

    def before(self, widths: Dict[str, Optional[int]], num_samples: Optional[int]) -> None:
        """Estimate N x D x itemsize x scores, summed over layers, and check it: now if N and every D are
        known, else once the first batch has shown the widths (when N is known)."""
        self.widths = {k: widths.get(k) for k in self.counts}
        self.num_samples = num_samples
        self.estimated = not self.counts
        if num_samples is None and self.counts:
            logger.info("model %r: the number of samples is not known before the pass; the features kept for "
                        "scores that cannot stream are checked against the limit as they come", self.model)
        self._estimate()

    def _estimate(self) -> None:
        if self.estimated or self.num_samples is None or any(w is None for w in self.widths.values()):
            return
        self.estimated = True
        total = sum(self.num_samples * int(self.widths[k] or 0) * self.itemsize * c for k, c in self.counts.items())
        self.check(total, "would keep")
        message = (f"model {self.model!r}: the scores that cannot stream will keep {total / 2**20:.1f} MiB of "
                   f"features ({self.num_samples} samples)")
        if total > WARN_COLLECT_BYTES:
            warnings.warn(message, ResourceWarning, stacklevel=2)
        logger.info(message)

    def add(self, key: str, rows: Tensor) -> None:
        count = self.counts.get(key, 0)
        if count:
            if self.widths.get(key) is None:  # the width shows with the first batch
                self.widths[key] = rows.shape[1]
                self.itemsize = rows.element_size()
                self._estimate()
            self.bytes += rows.shape[0] * rows.shape[1] * rows.element_size() * count
            if _distributed()[1] == 1:  # under torch.distributed a rank alone must not raise mid-pass
                self.check(self.bytes, "already keep")


def _compute(model: str, key: str, accs: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for score, acc in accs.items():
        try:
            out[score] = acc.compute()
        except (ValueError, TypeError, torch.linalg.LinAlgError) as err:
            raise ranking.ModelScoreError(model, score, f"layer {key!r}: {err}") from err
    return out


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then every submodule's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _progress(data: Any, name: str, settings: _Settings) -> Any:
    if not settings.progress or settings.rank != 0:
        return data
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.info("model %r: forward pass over %s batches", name, len(data) if hasattr(data, "__len__") else "the")
        return data
    return tqdm(data, desc=name, total=len(data) if hasattr(data, "__len__") else None, unit="batch", leave=False)


def _run_pass(name: str, model: nn.Module, data: Any, keys: List[Tuple[str, LayerSpec]], settings: _Settings,
              collected: _Collected, writers: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """One forward pass over ``data`` with every layer hooked; key -> score -> accumulator."""
    device = _model_device(model)
    state: Dict[str, Any] = {"mask": None}
    prepare = getattr(model, model_layers.PREPARE_ATTR, None)

    def features(key: str, spec: LayerSpec, value: Any) -> Tensor:
        try:
            if key.endswith(".probs"):
                rows = model_layers.probabilities(value, spec.label, settings.model_output)
            else:
                rows = model_layers.pool_value(value, settings.pool, spec.label, state["mask"])
        except (ValueError, TypeError) as err:
            raise type(err)(f"model {name!r}: {err}") from err
        collected.add(key, rows)
        if key in writers:
            writers[key].append(rows)
        return rows

    scorers = {}
    with ExitStack() as attached:
        for key, spec in keys:
            scorers[key] = attached.enter_context(hooks.LayerScorer(
                model, spec.name, scores=settings.scores_of(key), on=spec.on,
                transform=partial(features, key, spec),
                score_options={s: settings.options[s] for s in settings.scores_of(key)},
            ))
        autocast = (torch.autocast(device.type, dtype=settings.autocast) if settings.autocast is not None
                    else nullcontext())
        batches = 0
        for batch in _progress(data, name, settings):
            inputs, labels = model_layers.split_batch(batch)
            if prepare is not None:  # the model's own tokenizer or transform (model_layers.PREPARE_ATTR)
                inputs = prepare(inputs)
            inputs = _to_device(inputs, device)
            labels = _to_device(torch.as_tensor(labels), device)
            state["mask"] = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            with ExitStack() as batch_scope:  # every scorer takes the batch when the forward pass ran
                for scorer in scorers.values():
                    batch_scope.enter_context(scorer.batch(labels))
                with torch.inference_mode(), autocast:
                    _forward(model, inputs)
            batches += 1
        if _fewest_batches(batches) == 0:
            raise ValueError(
                "data gave no batches" + (" on some rank" if batches else "")
                + "; it must yield (inputs, labels) batches (under torch.distributed: on every rank)"
            )
    return {key: scorer.accumulators[spec.name] for (key, spec), scorer in zip(keys, scorers.values())}


def _from_cache(arrays: Dict[str, np.ndarray], labels: List[Tensor], device: torch.device, settings: _Settings,
                collected: _Collected) -> Dict[str, Dict[str, Any]]:
    """Accumulators fed with cached features, batch by batch as the pass fed them."""
    out = {}
    for key, array in arrays.items():
        accs = {s: registry.accumulator(s, array.shape[1], collect=True, device=device, **settings.options[s])
                for s in settings.scores_of(key)}
        start = 0
        for y in labels:
            rows = torch.from_numpy(np.array(array[start:start + y.shape[0]])).to(device)  # a writable copy
            collected.add(key, rows)
            for acc in accs.values():
                acc.update(rows, y.to(device))
            start += y.shape[0]
        out[key] = accs
    return out


def _num_samples(data: Any) -> Optional[int]:
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _score_model(name: str, build: Callable[[], nn.Module], owned: bool, data: Any, layers: Any, blocks: Any,
                 device: Optional[torch.device], settings: _Settings, cache: Optional[FeatureCache],
                 data_print: Callable[[], DataPrint]) -> Dict[str, Any]:
    """Build, score and free one model; its raw results (layer values, time, memory)."""
    memory = PeakMemory(device)
    memory.start()
    started = time.perf_counter()
    model = _build(name, build)
    if device is not None:
        model.to(device)
    specs = model_layers.resolve(model, layers, blocks, name)
    keys = _keys(specs, settings)
    where = _model_device(model)
    counts = {key: sum(not registry.SCORES[s].streams for s in settings.scores_of(key)) for key, _ in keys}
    collected = _Collected(name, settings, {k: c for k, c in counts.items() if c}, _model_itemsize(model))
    widths = {key: (None if key.endswith(".probs") else model_layers.known_width(model, spec)) for key, spec in keys}
    source = "forward"
    with _eval_mode(model):
        arrays, paths, printed = None, {}, None
        if cache is not None:
            printed = data_print()
            config = {"pool": _pool_id(settings.pool), "autocast": str(settings.autocast),
                      "model_output": settings.model_output}
            prepare = getattr(model, model_layers.PREPARE_ATTR, None)
            if prepare is not None:  # a tokenizer or transform shapes the features too
                config["prepare"] = getattr(prepare, "cache_key", None) or _pool_id(prepare)
            paths = cache.paths(name, model_fingerprint(model), printed.digest, [k for k, _ in keys], config)
            arrays = cache.load(paths, printed.num_samples)
            # Every rank reads its own cache: all take it, or all run the pass (their collectives must pair).
            if _fewest_batches(int(arrays is not None)) == 0:
                arrays = None
        if arrays is not None and printed is not None:
            collected.before({k: a.shape[1] for k, a in arrays.items()}, _num_samples(data) or printed.num_samples)
            accs = _from_cache(arrays, printed.labels, where, settings, collected)
            source = "cache"
        else:
            collected.before(widths, _num_samples(data))
            writers = FeatureCache.writers(paths) if cache is not None else {}
            try:
                accs = _run_pass(name, model, data, keys, settings, collected, writers)
                for writer in writers.values():
                    writer.close()
            finally:
                for writer in writers.values():
                    writer.abort()  # a no-op for those closed
            if cache is not None:
                FeatureCache.drop_stale(paths)
    values = {key: _compute(name, key, acc) for key, acc in accs.items()}
    if where.type == "cuda":
        torch.cuda.synchronize(where)  # the time counts the work, not its launch
    seconds = time.perf_counter() - started
    peak, kind = memory.peak(where)
    del accs
    if owned:
        del model
        gc.collect()
    if where.type == "cuda":
        torch.cuda.empty_cache()
    # The layers' labels: "output.probs" (LEEP / NCE) is reported on the "output" row.
    return {"values": values, "labels": [s.label for s in specs], "seconds": seconds, "peak": peak,
            "memory": kind, "source": source, "collected": collected.bytes}


def _pool_id(pool: Any) -> str:
    """What keys a pooling rule in the feature cache: its name, or a callable's name and code."""
    if isinstance(pool, str):
        return pool
    method = vars(type(pool)).get("__call__")  # a callable object: its class's method
    code = getattr(pool, "__code__", None) or getattr(method, "__code__", None)
    text = b"" if code is None else code.co_code + repr((code.co_consts, code.co_names)).encode()
    body = hashlib.sha256(text).hexdigest()[:16] if text else ""
    name = getattr(pool, "__qualname__", type(pool).__qualname__)
    return f"callable {getattr(pool, '__module__', '')}.{name} {body}"


# -- layers into a row ---------------------------------------------------------------------------------------

def _layer_table(raw: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """label -> score -> value (tensor: 0-dim, or the terms of a pooled score), "output.probs" merged into "output"."""
    table: Dict[str, Dict[str, Any]] = {label: {} for label in raw["labels"]}
    for key, values in raw["values"].items():
        label = OUTPUT if key.endswith(".probs") else key
        table.setdefault(label, {}).update(values)
    return table


def _combine_pooled(tables: Dict[str, Dict[str, Dict[str, Any]]], names: Sequence[str]) -> List[str]:
    """Replace each pooled score's terms by its combination across every (model, layer) scored; notes."""
    notes = []
    for s in names:
        spec = registry.SCORES[s]
        if not spec.pooled:
            continue
        cells = [(model, label) for model, table in tables.items() for label, values in table.items() if s in values]
        terms = [tables[m][label][s] for m, label in cells]
        for (m, label), t, v in zip(cells, terms, combine_terms(spec, terms)):
            tables[m][label][s] = v
            tables[m][label].update({f"{s}.{term}": float(x) for term, x in zip(spec.terms, t.tolist())})
        notes.append(pooled_note(
            spec, f"all {len(cells)} (model, layer) pairs scored here, as its published code does across models",
            "candidates"))
    return notes


def _aggregate(table: Dict[str, Dict[str, float]], labels: Sequence[str], settings: _Settings, aggregate: str,
               selected_by: str) -> Tuple[str, Dict[str, float]]:
    """(layer chosen, row values) of one model."""
    row: Dict[str, float] = {}
    for s in settings.probs_scores:  # one value per model, from its output
        row[s] = float(table[OUTPUT][s])
    if not settings.feature_scores:
        return OUTPUT, row
    feature_layers = [label for label in labels if label in table]
    if aggregate == "mean":
        keys = [k for k in table[feature_layers[0]] if k.split(".")[0] in settings.feature_scores]
        row.update({k: float(np.mean([float(table[label][k]) for label in feature_layers])) for k in keys})
        return "mean", row
    if aggregate == "last":
        chosen = feature_layers[-1]
    else:
        sign = 1.0 if registry.SCORES[selected_by].larger_is_better else -1.0
        finite = [label for label in feature_layers if not math.isnan(table[label][selected_by])]
        chosen = max(finite, key=lambda label: sign * table[label][selected_by]) if finite else feature_layers[0]
    row.update({k: float(v) for k, v in table[chosen].items() if k.split(".")[0] in settings.feature_scores})
    return chosen, row


# -- the entry point -----------------------------------------------------------------------------------------

def _checked_autocast(autocast: Any) -> Optional[torch.dtype]:
    if autocast is None:
        return None
    if not isinstance(autocast, torch.dtype) or not autocast.is_floating_point:
        raise TypeError(f"autocast must be None or a floating dtype (torch.bfloat16, torch.float16), got {autocast!r}")
    return autocast


def _checked_data(data: Any, passes: int) -> None:
    if isinstance(data, (Tensor, np.ndarray)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"data must be an iterable of (inputs, labels) batches, such as a DataLoader, got {type(data).__name__}"
        )
    if passes > 1 and isinstance(data, collections.abc.Iterator):  # not iter(data): it would start workers
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}) but is read once per model: pass a DataLoader "
            "or a list of batches"
        )
    # Outside torch.distributed only: there a rank's shard may be empty, and the ranks decide that together
    # after the pass (``_fewest_batches``), so that no rank raises alone while the others wait.
    if hasattr(data, "__len__") and len(data) == 0 and _distributed()[1] == 1:
        raise ValueError("data is empty: it must yield (inputs, labels) batches")


def rank_candidate_models(
    models: Union[Mapping[str, Any], Sequence[Any]],
    data: Any,
    scores: Union[str, Sequence[str]] = (DEFAULT_SCORE,),
    *,
    layers: Any = None,
    blocks: Any = None,
    pool: Any = "avg",
    aggregate: str = "best",
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
    autocast: Optional[torch.dtype] = None,
    num_classes: Optional[int] = None,
    score_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    model_output: str = "logits",
    cache: Any = None,
    max_collect_bytes: Optional[int] = DEFAULT_MAX_COLLECT_BYTES,
    progress: bool = True,
) -> ModelRanking:
    """Rank candidate models on labelled data: one forward pass each, every layer and score streamed.

    Called as ``torch_logme.rank_models(models, data, ...)``; see the guide
    "Selecting a pre-trained model".

    Args:
        models: name -> ``nn.Module``, or -> a zero-argument callable that
            builds one (built when its turn comes and freed after, so that
            one candidate is in memory at a time); or a list (named
            "model_0", ...). A string "<zoo>:<name>" is built by the
            adapter registered for the zoo: "timm:resnet50",
            "hf:bert-base-uncased", "torchvision:resnet50" (see
            :mod:`torch_logme.zoo`), or any :func:`register_adapter` added.
        data: an iterable of batches, read once per model (a DataLoader or a
            list, not a one-shot iterator, when there are several models).
            A batch is (inputs, labels) or a dict with "labels"; inputs are
            a tensor (``model(x)``), a dict (``model(**x)``; an
            "attention_mask" in it masks token pooling) or a tuple
            (``model(*x)``). Labels are class ids [B].
        scores: score names; the ranking follows the first. Feature scores
            read the layers; LEEP and NCE read the model's output (its
            source-class logits, see ``model_output``).
        layers: per model (a mapping name -> spec; models it leaves out get
            the default) or one spec for all: None (the input of the last
            ``nn.Linear``, the classifier), a layer (``"layer3"``,
            ``"fc:input"``, ``"output"``, an ``nn.Module``, a pair
            ``(layer, "input")``), a list of them, or ``"all"`` with
            ``blocks=``.
        blocks: with ``layers="all"``, per model or for all: a container's
            name (each of its children), a list of layers, or a module type
            (every module of that type).
        pool: how a layer's value becomes [B, D]: "avg" (default), "cls",
            "flatten" or a callable (see :mod:`torch_logme.model_layers`).
        aggregate: a model's row: "best" layer by the first feature score
            (default), the "last" layer, or the "mean" over its layers.
        dtype: the statistics' dtype (float64 by default).
        device: run each model there (``model.to(device)``, in place);
            None: where the model is.
        autocast: None, or the dtype of ``torch.autocast`` around the forward
            passes (torch.bfloat16, torch.float16); features are pooled to
            float32 and the statistics stay in ``dtype``.
        num_classes: the number of classes, for the scores that take it
            (None: from the labels seen).
        score_options: score name -> options of its accumulator.
        model_output: "logits" (softmax taken for LEEP / NCE) or "probs".
        cache: a directory for pooled features, reused when the model and
            data match (see :mod:`torch_logme.feature_cache`); None: nothing
            is stored.
        max_collect_bytes: the most bytes of features that scores which
            cannot stream may keep per model (None: no limit); checked
            before the pass when N and D are known, and as rows come.
        progress: a progress bar per model (tqdm, when installed; otherwise
            a log line through ``logging``).

    Returns:
        A :class:`ModelRanking`, best model first.

    Raises:
        ValueError / TypeError: bad options, layers a model lacks (checked
            for every model given as a module before any forward pass),
            empty data; :class:`~torch_logme.ranking.ModelScoreError` when a
            score rejects a layer's features; :class:`CollectLimitError`
            over ``max_collect_bytes``.
    """
    names = registry.score_names(scores)
    if isinstance(models, Mapping):
        items = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, (list, tuple)):
        items = [(f"model_{i}", v) for i, v in enumerate(models)]
    else:
        raise TypeError(f"models must be a dict of name -> model or a list, got {type(models).__name__}")
    if not items:
        raise ValueError("models is empty; give at least one model")
    one_of(aggregate, "aggregate", AGGREGATES)
    one_of(model_output, "model_output", MODEL_OUTPUTS)
    boolean(progress, "progress")
    pool = model_layers.check_pool(pool)
    autocast = _checked_autocast(autocast)
    checked_device = compute_options(dtype=dtype, device=device).device if device is not None else None
    compute_options(dtype=dtype)
    if max_collect_bytes is not None and (isinstance(max_collect_bytes, bool) or not isinstance(max_collect_bytes, int)
                                          or max_collect_bytes < 0):
        raise ValueError(f"max_collect_bytes must be None or an int >= 0, got {max_collect_bytes!r}")
    rank, world = _distributed()
    store = FeatureCache(cache, rank, world) if cache is not None else None
    _checked_data(data, len(items) + (store is not None))

    feature_scores = tuple(s for s in names if registry.SCORES[s].input == "features")
    probs_scores = tuple(s for s in names if registry.SCORES[s].input == "probs")
    shared: Dict[str, Any] = {"dtype": dtype}
    per_score: Dict[str, Dict[str, Any]] = {s: dict((score_options or {}).get(s, {})) for s in names}
    if num_classes is not None:
        for s in names:
            if "num_classes" in registry.accumulator_keywords(registry.SCORES[s]):
                per_score[s].setdefault("num_classes", num_classes)
    # Every score and option checked now, before any model is built.
    options = hooks.check_options("output", None, shared, scores=names, score_options=per_score)
    settings = _Settings(feature_scores, probs_scores, options, pool, autocast, model_output, max_collect_bytes,
                         progress, rank, world)
    selected_by = names[0] if names[0] in feature_scores else (feature_scores[0] if feature_scores else names[0])

    model_names = [n for n, _ in items]
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"model names are repeated: {model_names}")
    layers_of = model_layers.per_model(layers, model_names, "layers")
    blocks_of = model_layers.per_model(blocks, model_names, "blocks")
    everything = [n for n in model_names if isinstance(layers_of[n], str) and layers_of[n] == "all"]
    stray = [n for n in model_names if n not in everything and isinstance(blocks, Mapping) and n in blocks]
    if (blocks is not None and not everything) or stray:
        raise ValueError(f"blocks= applies only to models with layers='all'{f'; not to {stray}' if stray else ''}")
    builders = {n: _builder(n, v) for n, v in items}
    for n, v in items:  # modules at hand: their layers are checked before any forward pass
        if isinstance(v, nn.Module):
            model_layers.resolve(v, layers_of[n], blocks_of[n], n)

    printed: List[DataPrint] = []

    def data_print() -> DataPrint:
        if not printed:  # once per call, for every model
            printed.append(data_fingerprint(data, model_layers.split_batch, rank, world))
            # Decided with the other ranks (a rank's shard may be empty): none raises alone.
            if _fewest_batches(len(printed[0].labels)) == 0:
                raise ValueError("data gave no batches (under torch.distributed: on some rank); it must yield "
                                 "(inputs, labels) batches")
        return printed[0]

    raws = {}
    for n, _ in items:
        build, owned = builders[n]
        raws[n] = _score_model(n, build, owned, data, layers_of[n], blocks_of[n], checked_device, settings, store,
                               data_print)
        raw = raws[n]
        logger.info("model %r: %s in %.2f s, peak memory %s MiB", n,
                    "scored from the cache" if raw["source"] == "cache" else "forward pass and scores",
                    raw["seconds"], mib(raw["peak"]))

    tables = {n: _layer_table(raw) for n, raw in raws.items()}
    notes = _combine_pooled(tables, names)
    tables_f = {n: {label: {k: float(v) for k, v in values.items()} for label, values in t.items()}
                for n, t in tables.items()}
    rows = {}
    for n, raw in raws.items():
        chosen, row = _aggregate(tables_f[n], raw["labels"], settings, aggregate, selected_by)
        asked = {s: i for i, s in enumerate(names)}  # the scores in the order asked, each before its terms
        rows[n] = (chosen, dict(sorted(row.items(), key=lambda kv: (asked[kv[0].split(".")[0]], kv[0]))))

    first = names[0]
    sign = -1.0 if registry.SCORES[first].larger_is_better else 1.0

    def key(n: str) -> Tuple[bool, float]:
        v = rows[n][1][first]
        return (math.isnan(v), 0.0 if math.isnan(v) else sign * v)

    order = sorted(model_names, key=key)  # stable: ties keep the input order
    entries = tuple(
        ModelEntry(r + 1, n, rows[n][1], layer=rows[n][0], layers=tables_f[n], seconds=raws[n]["seconds"],
                   peak_memory=raws[n]["peak"], features_from=raws[n]["source"],
                   collected_bytes=raws[n]["collected"])
        for r, n in enumerate(order)
    )
    memory = tuple(PeakMemory.HOW.get(kind, f"{kind}: not measured")
                   for kind in dict.fromkeys(raw["memory"] for raw in raws.values()))
    return ModelRanking(names, entries, tuple(notes), aggregate=aggregate, selected_by=selected_by, memory=memory)
