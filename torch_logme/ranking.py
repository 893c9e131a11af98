"""Rank pre-trained models by transferability scores: ``rank_models`` and the ``rank`` command.

Every model is scored on the same labels with each chosen score; models are
ordered by the first score, best first (every score here is "larger is
better"; the table says so). Feature scores (LogME, H-scores, TransRate,
GBC) read each model's features [N, D]. LEEP and NCE score the source
model's *predictions* instead: they read each model's source-class
probabilities [N, Cs] (NCE takes their argmax as the hard source labels).
A model given as a mapping may hold both, under the keys ``"features"`` and
``"probs"``; a plain array is used for whichever kind a score needs.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import prepare_labels
from ._options import compute_options
from ._pool import combine_terms, pooled_note
from .registry import DEFAULT_SCORE, SCORES, ScoreSpec, score_names

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["rank_models", "Ranking", "RankedModel", "SCORES", "ScoreSpec", "ModelScoreError"]


class ModelScoreError(ValueError):
    """A model's input could not be scored; ``model`` and ``score`` say which."""

    def __init__(self, model: str, score: str, message: str) -> None:
        super().__init__(f"model {model!r}, score {score!r}: {message}")
        self.model = model
        self.score = score
        self.reason = message


@dataclass(frozen=True)
class RankedModel:
    """One row of a ranking: 1-based rank, model name, score values by score name."""

    rank: int
    name: str
    scores: Dict[str, float]


@dataclass(frozen=True)
class Ranking:
    """Models ordered by ``scores[0]``, best first.

    ``str(ranking)`` is a table in that order; ``ranking.models`` the names;
    ``ranking.to_dict()`` a JSON-ready dict. Iterating gives RankedModel rows.
    ``notes``: how scores normalised across the pool of models were combined
    (their rows also hold each term, as "<score>.<term>").
    """

    scores: Tuple[str, ...]
    entries: Tuple[RankedModel, ...]
    notes: Tuple[str, ...] = ()

    @property
    def models(self) -> List[str]:
        return [e.name for e in self.entries]

    @property
    def best(self) -> str:
        return self.entries[0].name

    def __iter__(self) -> Iterator[RankedModel]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> RankedModel:
        return self.entries[index]

    def to_dict(self) -> Dict[str, Any]:
        """{"ranked_by", "scores", "larger_is_better", "ranking": [{"rank", "model", <score>: value}], "notes"}.

        A pooled score's row also holds each term, as "<score>.<term>".

        NaN scores become None (JSON null).
        """
        def clean(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        return {
            "ranked_by": self.scores[0],
            "scores": list(self.scores),
            "larger_is_better": {s: SCORES[s].larger_is_better for s in self.scores},
            "ranking": [
                {"rank": e.rank, "model": e.name, **{s: clean(v) for s, v in e.scores.items()}}
                for e in self.entries
            ],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def plot(
        self,
        ground_truth: Optional[Mapping[str, float]] = None,
        *,
        scores: Optional[Sequence[str]] = None,
        ax: Union[Axes, Sequence[Axes], None] = None,
        ncols: Optional[int] = None,
        figsize: Optional[Tuple[float, float]] = None,
        ground_truth_label: str = "ground truth (e.g. fine-tuned accuracy)",
    ) -> Tuple[Figure, List[Axes]]:
        """Plot the ranking with matplotlib (the ``plot`` extra): one panel per score.

        Without ``ground_truth``: a horizontal bar chart of each score, the
        models sorted best first (at the top) by that panel's score, in its
        direction (``SCORES[name].larger_is_better``); a model without a
        finite value comes last, labelled "n/a". With ``ground_truth``: each
        score against the ground truth, one point per model, labelled by its
        name, with the weighted Kendall tau (:func:`torch_logme.weighted_tau`,
        the score negated first where smaller is better) in the panel's
        title; models without a finite score are left out of that panel (the
        title says how many). A pooled score (NCTI, ETran) is plotted as the
        ranking holds it: combined across the models of this ranking.

        Never calls ``plt.show()`` and changes no rcParams.

        Args:
            ground_truth: model name -> a finite number (e.g. fine-tuned
                accuracy; a dict or a pandas Series), for every model of the
                ranking and no other.
            scores: the scores to plot, in panel order (default: all of
                ``self.scores``).
            ax: Axes to draw on, one per panel (a sequence, or the array
                ``plt.subplots`` returns; one Axes for one panel). Default: a
                new figure.
            ncols: panels per row of a new figure (default: up to 2).
            figsize: (width, height) in inches of a new figure (default: from
                the number of panels and models).
            ground_truth_label: the x-axis label of the scatter plots.

        Returns:
            ``(fig, axes)``: the Figure and the list of Axes drawn on, one per
            score, as torchmetrics' ``Metric.plot`` returns ``(fig, ax)``.

        Raises:
            ImportError: matplotlib is not installed (``pip install "torch_logme[plot]"``).
            ValueError: ``ground_truth`` names a model that is not ranked,
                lacks one that is, holds a non-finite value, or the ranking
                has fewer than 2 models; ``scores`` names a score the ranking
                does not hold; ``ax`` holds another number of Axes than panels.
            TypeError: a ground-truth value that is not a number, or an
                ``ax`` that is not matplotlib Axes.
        """
        from .plotting import plot_ranking  # imports matplotlib

        return plot_ranking(self, ground_truth, scores=scores, ax=ax, ncols=ncols, figsize=figsize,
                            ground_truth_label=ground_truth_label)

    def __str__(self) -> str:
        header = ["rank", "model", *self.scores]
        rows = [[str(e.rank), e.name, *(f"{e.scores[s]:.6g}" for s in self.scores)] for e in self.entries]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

        def line(cells: List[str]) -> str:
            # Model names left-aligned, numbers right-aligned.
            padded = (c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            return "  ".join(padded).rstrip()

        direction = "larger is better" if SCORES[self.scores[0]].larger_is_better else "smaller is better"
        out = [f"ranked by {self.scores[0]} ({direction}), best first", line(header), "-" * len(line(header))]
        out += [line(r) for r in rows]
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)


def _score_input(name: str, model: Any, score: str) -> Any:
    kind = SCORES[score].input
    if isinstance(model, Mapping):
        if kind not in model:
            keys = ", ".join(map(repr, model)) or "none"
            what = "features [N, D]" if kind == "features" else "source-class probabilities [N, Cs]"
            raise ModelScoreError(name, score, f"needs {kind!r} ({what}); the model has keys {keys}")
        return model[kind]
    return model


def rank_models(
    features_by_model: Union[Mapping[str, Any], Sequence[Any]],
    labels: Any,
    scores: Union[str, Sequence[str]] = (DEFAULT_SCORE,),
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
    score_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    **model_options: Any,
) -> Ranking:
    """Score several models on one labelled task and rank them, best first.

    Given models instead of features (``nn.Module`` values, zero-argument
    callables that build them, or zoo names), this runs each model once
    over labelled batches and scores its layers as it goes:
    ``rank_models(models, data, scores, layers=..., ...)``; see
    :func:`torch_logme.model_ranking.rank_candidate_models` for those
    options, and the guide "Selecting a pre-trained model". What follows is
    the ranking of stored features.

    Args:
        features_by_model: name -> features [N, D] (tensor or numpy array,
            D may differ between models), or a list (named "model_0", ...).
            For "leep" and "nce" the model's input is its source-class
            probabilities [N, Cs] instead; a model may also be a mapping
            {"features": [N, D], "probs": [N, Cs]} to serve both kinds.
        labels: class ids [N], shared by all models.
        scores: score names (see ``SCORES``); the ranking follows the first.
        dtype: the compute precision, passed to every score.
        device: the compute device, passed to every score.
        score_options: extra keywords per score name, e.g.
            ``{"transrate": {"eps": 1e-3}}``.

    Returns:
        A Ranking; ``str()`` of it is a table, best model first. A NaN score
        ranks last; ties keep the input order.

    Raises:
        ModelScoreError: (a ValueError) names the model and score whose
            input is bad, with the score's own message.
    """
    from .model_ranking import is_models, rank_candidate_models  # it builds on this module

    if is_models(features_by_model):
        return rank_candidate_models(features_by_model, labels, scores, dtype=dtype, device=device,
                                     score_options=score_options, **model_options)
    if model_options:
        raise TypeError(
            f"{', '.join(sorted(model_options))}: options of ranking models (nn.Module or builders), "
            "but features were given"
        )
    names = score_names(scores)
    if isinstance(features_by_model, Mapping):
        models = [(str(k), v) for k, v in features_by_model.items()]
    elif isinstance(features_by_model, (list, tuple)):
        models = [(f"model_{i}", v) for i, v in enumerate(features_by_model)]
    else:
        raise TypeError(
            f"features_by_model must be a dict of name -> features or a list, got {type(features_by_model).__name__}"
        )
    if not models:
        raise ValueError("features_by_model is empty; give at least one model")
    compute_options(dtype=dtype, device=device)  # a bad option fails here, not as a model's error
    prepare_labels(labels, "labels")  # so do bad labels
    options = {s: dict((score_options or {}).get(s, {})) for s in names}
    unknown = set(score_options or {}) - set(names)
    if unknown:
        raise ValueError(f"score_options for scores not requested: {sorted(unknown)}")

    table: List[Dict[str, float]] = []
    terms: Dict[str, List[Tensor]] = {s: [] for s in names if SCORES[s].pooled}
    for name, model in models:
        row = {}
        for s in names:
            spec = SCORES[s]
            value = _score_input(name, model, s)
            try:
                out = spec.fn(value, labels, dtype=dtype, device=device, **options[s])
            except (ValueError, TypeError, torch.linalg.LinAlgError) as err:
                # LinAlgError (a RuntimeError) is the model's input too, e.g. features a
                # factorization cannot take: report it as the model's, like a ValueError.
                raise ModelScoreError(name, s, str(err)) from err
            if spec.pooled:  # combined across the models below, once all are scored
                terms[s].append(out)
                row.update({f"{s}.{term}": float(v) for term, v in zip(spec.terms, out.tolist())})
            else:
                row[s] = float(out)
        table.append(row)
    notes = []
    for s, per_model in terms.items():
        for row, v in zip(table, combine_terms(SCORES[s], per_model)):
            row[s] = v
        notes.append(pooled_note(SCORES[s], f"the {len(models)} models ranked here, as its published code does",
                                 "models"))

    first = names[0]
    sign = -1.0 if SCORES[first].larger_is_better else 1.0

    def key(i: int) -> Tuple[bool, float]:
        v = table[i][first]
        return (math.isnan(v), 0.0 if math.isnan(v) else sign * v)

    order = sorted(range(len(models)), key=key)  # stable: ties keep the input order
    entries = tuple(RankedModel(r + 1, models[i][0], table[i]) for r, i in enumerate(order))
    return Ranking(names, entries, tuple(notes))


# -- the `rank` command ------------------------------------------------------------

FILE_TYPES = (".npy", ".npz", ".pt", ".pth")
LABEL_KEYS = ("labels", "targets", "y")


class InputFileError(ValueError):
    """A file given to the ``rank`` command cannot be used; the message names it."""


class _NpzArrays(Mapping[str, np.ndarray]):
    """The arrays of an .npz file by name, each read from the file only when it is asked for.

    An .npz may hold large arrays the command never uses; reading them all
    would cost their full size in memory, so only the names are read here.
    """

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = path
        self.names = list(names)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.names:
            raise KeyError(key)
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                return archive[key]
        except Exception as err:  # a corrupt member fails only when it is read
            raise InputFileError(
                f"{self.path}: cannot read its array {key!r} ({type(err).__name__}: {err})"
            ) from None

    def __contains__(self, key: object) -> bool:
        # Mapping's default would read the array (self[key]) just to answer.
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _read(path: Path) -> Union[np.ndarray, Tensor, Mapping[str, Any]]:
    """The array, or the mapping of arrays, stored in a .npy, .npz or .pt file.

    The arrays of an .npz file are read lazily, one when it is used.
    """
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise InputFileError(f"{path}: unknown file type {suffix or '(none)'!r}; expected .npy, .npz or .pt")
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return _NpzArrays(path, archive.files)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # numpy, zipfile and pickle raise many types for a corrupt file
        raise InputFileError(f"{path}: cannot read it as a {suffix} file ({type(err).__name__}: {err})") from None
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise InputFileError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def _pick(path: Path, content: Any, keys: Sequence[str], what: str) -> Any:
    """The one array in ``content``, or the first of ``keys`` when it holds several."""
    if not isinstance(content, Mapping):
        return content
    if not content:
        raise InputFileError(f"{path}: holds no arrays")
    if len(content) == 1:
        return content[next(iter(content))]
    for key in keys:
        if key in content:
            return content[key]
    raise InputFileError(
        f"{path}: holds several arrays ({', '.join(content)}); name the {what} one {' or '.join(map(repr, keys))}"
    )


def load_model_file(path: Union[str, Path]) -> Any:
    """A model's input from a file: one array, or {"features", "probs"} from a multi-array file."""
    path = Path(path)
    content = _read(path)
    if isinstance(content, Mapping) and len(content) > 1:
        picked = {k: content[k] for k in ("features", "probs") if k in content}
        if not picked:
            raise InputFileError(
                f"{path}: holds several arrays ({', '.join(content)}); name them 'features' and/or 'probs'"
            )
        return picked
    return _pick(path, content, (), "features")


def load_labels_file(path: Union[str, Path]) -> Any:
    """Labels [N] from a file: its one array, or the one named labels / targets / y."""
    path = Path(path)
    return _pick(path, _read(path), LABEL_KEYS, "labels")


def model_names(paths: Sequence[Path]) -> List[str]:
    """Names for the models in ``paths``: file stems, lengthened with parent folders until unique.

    Distinct files that differ only in their suffix (``same.npy``, ``same.pt``)
    keep it in their names (``same.npy``, ``same.pt``), so that no two models
    share a name.

    Raises:
        InputFileError: a path is given twice.
    """
    parts = [p.with_suffix("").parts for p in paths]
    # Stems alone cannot tell these apart at any depth: they need their suffix.
    clashing = {i for i, p in enumerate(paths) for j, q in enumerate(paths)
                if i != j and parts[i] == parts[j] and p.parts != q.parts}
    parts = [paths[i].parts if i in clashing else ps for i, ps in enumerate(parts)]
    depth = 1
    while True:
        names = ["/".join(ps[-depth:]) for ps in parts]
        if len(set(names)) == len(names) or all(depth >= len(ps) for ps in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputFileError(f"the same file is given twice: {', '.join(dupes)}")
    return names


def _identity(path: Path) -> Tuple[Any, ...]:
    """What makes two paths the same file: its device and inode, or its real path if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:  # a missing file is reported when it is read; compare its path meanwhile
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _feature_paths(paths: Sequence[Path], labels_path: Path) -> List[Path]:
    """``paths`` without the labels file; InputFileError if one file is given twice.

    Files are compared by identity, not by name: ``good.npy`` and
    ``$PWD/good.npy`` are one file, ``same.npy`` and ``same.pt`` two.
    The labels file is dropped so that ``rank *.npy --labels labels.npy``
    works with the labels beside the features.
    """
    labels_id = _identity(labels_path)
    seen: Dict[Tuple[Any, ...], Path] = {}
    kept: List[Path] = []
    for path in paths:
        key = _identity(path)
        if key == labels_id:
            continue
        if key in seen:
            raise InputFileError(f"the same file is given twice: {seen[key]} and {path}")
        seen[key] = path
        kept.append(path)
    if not kept:
        raise InputFileError(f"no features files: the only file given is the labels file {labels_path}")
    return kept


def _rows(x: Any) -> Optional[int]:
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) >= 1 else None


def rank_files(
    feature_paths: Sequence[Union[str, Path]],
    labels_path: Union[str, Path],
    scores: Sequence[str] = (DEFAULT_SCORE,),
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Ranking, Dict[str, str]]:
    """Read the files and rank the models; returns (ranking, model name -> file).

    The labels file is not a model: it is left out of ``feature_paths``
    (so ``*.npy`` may match it). Files are told apart by identity, not name.

    Raises:
        InputFileError: naming the file, for unreadable files, one file given
            twice, files with another number of rows than the labels, and
            inputs a score rejects.
        ValueError: a bad score name, dtype, or a device this torch cannot use.
    """
    scores = score_names(scores)
    compute_options(dtype=dtype, device=device)  # also tries the device: an unusable one is one line
    paths = [Path(p) for p in feature_paths]
    labels_path = Path(labels_path)
    labels = load_labels_file(labels_path)
    try:
        prepare_labels(labels, "labels")
    except (ValueError, TypeError) as err:
        raise InputFileError(f"{labels_path} (labels): {err}") from None
    n = _rows(labels)
    paths = _feature_paths(paths, labels_path)
    names = model_names(paths)
    models: Dict[str, Any] = {}
    for name, path in zip(names, paths):
        model = load_model_file(path)
        for part in (model.values() if isinstance(model, Mapping) else [model]):
            rows = _rows(part)
            if rows != n:
                got = "a scalar" if rows is None else f"{rows} rows"
                raise InputFileError(f"{path}: has {got}, but the labels in {labels_path} have {n}")
        models[name] = model
    files = {name: str(path) for name, path in zip(names, paths)}
    try:
        ranking = rank_models(models, labels, scores, device=device, dtype=dtype)
    except ModelScoreError as err:
        raise InputFileError(f"{files[err.model]} ({err.score}): {err.reason}") from None
    return ranking, files
