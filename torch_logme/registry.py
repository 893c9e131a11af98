"""The scores by name: one spec per score, which every entry point reads.

``SCORES`` maps a score's name to its :class:`ScoreSpec`: its functional
form, its streaming accumulator (when it streams), what it reads, which
direction is better, and its paper. ``accumulator(name, ...)`` builds the
accumulator of any streaming score. Hooks, checkpoint selection, the
Lightning callback, the torchmetrics metric, ``rank_models`` and the CLI
take a score by name through this module, so none of them names a score in
its code.

Adding a score: its functional form and accumulator in their modules, one
``ScoreSpec`` in ``_SPECS`` below, its numpy reference in
``torch_logme.reference`` and one entry in the shared test table
(``tests/score_table.py``); see docs/design.md, "Adding a score".
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from torch import Tensor

from ._checks import source_labels
from ._validators import boolean
from .collecting import CollectingAccumulator
from .collecting import keywords as collecting_keywords
from .etran import TERMS as ETRAN_TERMS
from .etran import etran, etran_combine
from .functional import logme
from .knn import knn
from .ncti import TERMS as NCTI_TERMS
from .ncti import ncti, ncti_combine
from .nleep import nleep
from .parc import parc
from .scores import gbc, h_score, leep, nce, regularized_h_score, transrate
from .sfda import sfda
from .streaming import LogMEAccumulator
from .streaming_scores import (
    GBCAccumulator,
    HScoreAccumulator,
    NCEAccumulator,
    RegularizedHScoreAccumulator,
    TransRateAccumulator,
)

__all__ = [
    "SCORES", "ScoreSpec", "INPUTS", "DEFAULT_SCORE", "accumulator", "accumulator_keywords", "get_score",
    "score_names", "shared_names", "streaming_spec",
]

#: What a score reads: a model's features [N, D], or its source-class
#: probabilities [N, Cs] (LEEP; NCE takes their argmax as hard source labels).
INPUTS = ("features", "probs")


def _nce_from_probs(probs: Any, labels: Any, **options: Any) -> Tensor:
    """NCE of a model given its source-class probabilities [N, Cs] (or hard source labels [N])."""
    return nce(source_labels(probs), labels, **options)


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score.

    Attributes:
        fn: the functional form, ``fn(inputs, labels, *, dtype, device, **options)``
            -> 0-dim tensor; ``inputs`` as ``input`` says.
        input: "features" ([N, D]) or "probs" (source-class probabilities [N, Cs]).
        larger_is_better: the direction of the score (checkpoint selection
            and ranking follow it).
        paper: where the score is defined.
        accumulator_cls: the streaming accumulator, or None when the score
            cannot stream in one pass (LEEP).
        name: the registry key.
        no_stream_reason: why a score without an accumulator cannot stream
            (``accumulator(name)`` says it).
        terms: for a score that the published code normalises across the
            pool of candidate models: the names of the per-model terms that
            ``fn`` returns ([T], in this order); () for a plain score.
        combine: with ``terms``: the published combination, terms [M, T] of
            M models -> scores [M]; ``rank_models`` applies it to the models
            it ranks.
    """

    fn: Callable[..., Tensor]
    input: str
    larger_is_better: bool
    paper: str
    accumulator_cls: Optional[type] = None
    name: str = ""
    no_stream_reason: str = ""
    terms: Tuple[str, ...] = ()
    combine: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def streams(self) -> bool:
        """Whether the score has an accumulator (one pass over batches, constant memory)."""
        return self.accumulator_cls is not None

    @property
    def pooled(self) -> bool:
        """Whether the score is normalised across a pool of models (``fn`` returns terms; see ``combine``)."""
        return bool(self.terms)

    @property
    def mode(self) -> str:
        """"max" or "min": which extreme is best, as checkpoint callbacks spell it."""
        return "max" if self.larger_is_better else "min"


_SPECS: Tuple[ScoreSpec, ...] = (
    ScoreSpec(logme, "features", True, "You et al., ICML 2021; JMLR 2022", LogMEAccumulator, "logme"),
    ScoreSpec(leep, "probs", True, "Nguyen et al., ICML 2020", None, "leep",
              no_stream_reason="it needs every sample's predictions at once"),
    ScoreSpec(_nce_from_probs, "probs", True, "Tran et al., ICCV 2019", NCEAccumulator, "nce"),
    ScoreSpec(h_score, "features", True, "Bao et al., ICIP 2019", HScoreAccumulator, "h_score"),
    ScoreSpec(regularized_h_score, "features", True, "Ibrahim et al., ECML PKDD 2022", RegularizedHScoreAccumulator,
              "regularized_h_score"),
    ScoreSpec(transrate, "features", True, "Huang et al., ICML 2022", TransRateAccumulator, "transrate"),
    ScoreSpec(gbc, "features", True, "Pándy et al., CVPR 2022", GBCAccumulator, "gbc"),
    ScoreSpec(sfda, "features", True, "Shao et al., ECCV 2022", None, "sfda",
              no_stream_reason="it refits its discriminant to samples mixed by a first fit's predictions, "
              "so it reads every sample several times"),
    ScoreSpec(ncti, "features", True, "Wang et al., ICCV 2023", None, "ncti",
              no_stream_reason="its probability terms need a PCA and an LDA fitted to all samples first",
              terms=NCTI_TERMS, combine=ncti_combine),
    ScoreSpec(nleep, "features", True, "Li et al., CVPR 2021", None, "nleep",
              no_stream_reason="its Gaussian mixture is fitted by EM, many passes over every sample"),
    ScoreSpec(etran, "features", True, "Gholami et al., ICCV 2023", None, "etran",
              no_stream_reason="its LDA term scores every sample with a classifier fitted to all of them, and its "
              "energy term averages the lowest 0.5% of every sample's energy",
              terms=ETRAN_TERMS, combine=etran_combine),
    ScoreSpec(knn, "features", True, "Garbas et al., TransformerRanker, arXiv 2024 (its kNN estimator)",
              None, "knn", no_stream_reason="it needs every sample's distances to all the others"),
    ScoreSpec(parc, "features", True, "Bolya et al., NeurIPS 2021", None, "parc",
              no_stream_reason="it ranks the correlations of all pairs of samples"),
)

#: Every registered score by name (read-only).
SCORES: Mapping[str, ScoreSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})

#: The score an entry point uses when none is named (hooks, checkpoint selection, the Lightning callback).
DEFAULT_SCORE = "logme"


def get_score(name: Any) -> ScoreSpec:
    """The spec of a registered score; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose from {', '.join(SCORES)}")
    return SCORES[name]


def score_names(scores: Any) -> Tuple[str, ...]:
    """One score name or a sequence of them, checked: registered, none repeated, at least one."""
    names = (scores,) if isinstance(scores, str) else tuple(scores)
    if not names:
        raise ValueError("scores must name at least one score")
    for name in names:
        get_score(name)
    if len(set(names)) != len(names):
        raise ValueError(f"scores are repeated: {names}")
    return names


def streaming_spec(name: Any) -> ScoreSpec:
    """The spec of a registered score that streams; ValueError naming the ones that do otherwise."""
    spec = get_score(name)
    if spec.accumulator_cls is None:
        streaming = ", ".join(n for n, other in SCORES.items() if other.streams)
        what = "predictions" if spec.input == "probs" else "features"
        raise ValueError(
            f"score {name!r} does not stream ({spec.no_stream_reason or 'it needs every sample at once'}), so it "
            f"has no accumulator; choose from {streaming}, score stored {what} with torch_logme.{spec.fn.__name__}, "
            "or pass collect=True to keep every batch (memory grows with the samples)"
        )
    return spec


def accumulator_keywords(spec: ScoreSpec, *, keyword_only: bool = False) -> Tuple[str, ...]:
    """The keywords a score's accumulator takes after its first argument (the width).

    For a score that cannot stream: those of its collecting accumulator
    (``accumulator(name, collect=True)``). ``keyword_only=True``: only its
    settings (dtype, check_inputs, the score's own options), not the sizes
    it also takes positionally.
    """
    if spec.accumulator_cls is None:
        return collecting_keywords(spec)
    params = list(inspect.signature(spec.accumulator_cls).parameters.values())[1:]
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if keyword_only else (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(p.name for p in params if p.kind in kinds)
    if _TARGET_CLASSES in names and "num_classes" not in names:
        names += ("num_classes",)  # accumulator() takes it under that name too
    return names


# The target task's classes are num_classes for every score; an accumulator that also
# counts source classes (NCE) names them this. accumulator() is the one place that maps them.
_TARGET_CLASSES = "num_target_classes"


def shared_names(name: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` for the score ``name`` under the names every score shares (num_classes for NCE's
    num_target_classes), so that options from several places can be merged key by key.

    Raises TypeError when ``options`` gives one option under both names.
    """
    out = dict(options)
    if _TARGET_CLASSES in out:
        if "num_classes" in out:
            raise TypeError(
                f"{name}: 'num_classes' and {_TARGET_CLASSES!r} are the same option here; give one of them"
            )
        out["num_classes"] = out.pop(_TARGET_CLASSES)
    return out


def accumulator(name: str, num_features: Optional[int] = None, *, collect: bool = False, **options: Any) -> Any:
    """The streaming accumulator of the score ``name``.

    Args:
        name: a key of ``SCORES`` whose score streams (any key with ``collect``).
        num_features: D, the width of the feature batches (feature scores:
            required); for NCE, the number of source classes (optional,
            grown from the data when None).
        collect: for a score that cannot stream, a
            :class:`~torch_logme.collecting.CollectingAccumulator`, which keeps
            every batch (N x D values) and scores them all in ``compute()``.
            Ignored for a score that streams.
        **options: the accumulator's own keywords (``num_classes``, ``dtype``,
            ``device``, ``sync_on_compute``, ``check_inputs`` and the score's
            settings).

    Every accumulator has ``update / compute / reset / merge / state_dict /
    load_state_dict / sync``. Raises ValueError for an unknown score, a
    score that does not stream (without ``collect``), or a missing
    ``num_features``.
    """
    boolean(collect, "collect")
    if collect and not get_score(name).streams:
        return CollectingAccumulator(get_score(name), num_features, **options)
    spec = streaming_spec(name)
    assert spec.accumulator_cls is not None  # streaming_spec checked it
    options = shared_names(name, options)
    if "num_classes" in options and _TARGET_CLASSES in inspect.signature(spec.accumulator_cls).parameters:
        options[_TARGET_CLASSES] = options.pop("num_classes")
    if spec.input == "probs":
        return spec.accumulator_cls(num_features, **options)
    if num_features is None:
        raise ValueError(f"accumulator({name!r}) needs num_features, the width D of the feature batches")
    return spec.accumulator_cls(num_features, **options)
