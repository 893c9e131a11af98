"""Check transferability scores against fine-tuning results: ``weighted_tau`` and ``evaluate_scores``.

A score is good when it orders the candidate models as their fine-tuned
accuracy does. The transferability literature measures that with the
weighted Kendall tau (Vigna, WWW 2015, hyperbolic weights, as
``scipy.stats.weightedtau`` computes it by default), which counts swaps
among the best models more than swaps among the worst. Kendall's tau-b,
Spearman's rho and the top-1 hit (does the score pick the best model?)
complete the picture. Every statistic here equals scipy's to rounding, but
scipy is not needed: the number of models is small, so the pair counts are
computed directly, in row blocks, with integer arithmetic.
"""
from __future__ import annotations

import csv
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .ranking import InputFileError, Ranking
from .registry import SCORES

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "weighted_tau", "kendall_tau", "spearman", "evaluate_scores",
    "Evaluation", "TaskEvaluation", "ScoreEvaluation", "METRICS",
    "evaluate_files", "read_scores_csv", "read_ground_truth_csv",
]

#: The statistics reported for each score, in table order.
METRICS = ("weighted_tau", "kendall_tau", "spearman", "top1")

# Pairwise comparisons are made in row blocks of about this many elements (int8 each).
_BLOCK_ELEMENTS = 1 << 22


# -- the statistics ------------------------------------------------------------------


def _vector(values: Any, what: str) -> np.ndarray:
    """``values`` as a 1-D numpy array of real numbers, in a dtype that keeps their order and ties exactly."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16; widening is exact
            values = values.double()
        arr = values.numpy()
    else:
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what} must be a 1-D sequence of numbers: {err}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one value per model), got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        nan = np.flatnonzero(np.isnan(arr))
        if nan.size:
            raise ValueError(f"{what} holds NaN at position(s) {nan[:5].tolist()}; every value must be a number")
    return arr


def _pair(scores: Any, ground_truth: Any) -> Tuple[np.ndarray, np.ndarray]:
    x = _vector(scores, "scores")
    y = _vector(ground_truth, "ground_truth")
    if x.size != y.size:
        raise ValueError(
            f"scores and ground_truth must have the same length (one value per model), got {x.size} and {y.size}"
        )
    if x.size < 2:
        raise ValueError(f"a rank correlation needs at least 2 models, got {x.size}")
    return x, y


def _sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Comparisons, not a - b: exact for every dtype (no overflow, inf - inf is no NaN).
    return (a > b).view(np.int8) - (a < b).view(np.int8)


@dataclass(frozen=True)
class _PairCounts:
    """Per model i, over all models j: sum of sign(dx) sign(dy); count of j with x_j != x_i; same for y.

    Every statistic here is a (weighted) sum of these over i: a pair {i, j}
    with weight w_i + w_j contributes w_i to i's row and w_j to j's row.
    """

    concordance: np.ndarray
    x_untied: np.ndarray
    y_untied: np.ndarray


def _pair_counts(x: np.ndarray, y: np.ndarray) -> _PairCounts:
    n = x.size
    conc = np.empty(n, np.int64)
    ux = np.empty(n, np.int64)
    uy = np.empty(n, np.int64)
    step = max(1, _BLOCK_ELEMENTS // n)  # O(step x n) memory, whatever the number of models
    for start in range(0, n, step):
        rows = slice(start, start + step)
        sx = _sign(x[rows, None], x[None, :])
        sy = _sign(y[rows, None], y[None, :])
        conc[rows] = (sx * sy).sum(axis=1, dtype=np.int64)
        ux[rows] = np.count_nonzero(sx, axis=1)
        uy[rows] = np.count_nonzero(sy, axis=1)
    return _PairCounts(conc, ux, uy)


def _clip(tau: float) -> float:
    return float(min(1.0, max(-1.0, tau)))


def _weighted_tau(x: np.ndarray, y: np.ndarray, counts: _PairCounts) -> float:
    halves = []
    for first, second in ((x, y), (y, x)):
        # Rank 0 is the largest (first, second) pair; a joint tie goes to the later index
        # first, as the stable lexicographic sort reversed gives it.
        order = np.lexsort((second, first))
        rank = np.empty(x.size, np.int64)
        rank[order[::-1]] = np.arange(x.size)
        weight = 1.0 / (rank + 1.0)  # the hyperbolic weigher
        untied_x = float(weight @ counts.x_untied)
        untied_y = float(weight @ counts.y_untied)
        if untied_x == 0.0 or untied_y == 0.0:  # a constant sequence: undefined, as in scipy
            return math.nan
        halves.append(_clip(float(weight @ counts.concordance) / math.sqrt(untied_x) / math.sqrt(untied_y)))
    return (halves[0] + halves[1]) / 2


def _kendall_tau_b(counts: _PairCounts) -> float:
    # Each pair is counted from both ends: halve the exact integer sums.
    concordant_minus_discordant = int(counts.concordance.sum()) // 2
    untied_x = int(counts.x_untied.sum()) // 2
    untied_y = int(counts.y_untied.sum()) // 2
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return _clip(concordant_minus_discordant / np.sqrt(untied_x) / np.sqrt(untied_y))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    ranks = np.empty(a.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if (x == x[0]).all() or (y == y[0]).all():
        return math.nan
    rx = _average_ranks(x)
    ry = _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    # Pearson's r of the ranks, in numpy.corrcoef's order of operations (scipy's route): covariances
    # scaled by 1/(n-1), then divided by each standard deviation in turn. Exact 1.0 for identical orders.
    scale = 1.0 / (x.size - 1)
    cov, var_x, var_y = float(rx @ ry) * scale, float(rx @ rx) * scale, float(ry @ ry) * scale
    return _clip(cov / math.sqrt(var_x) / math.sqrt(var_y))


def weighted_tau(scores: Any, ground_truth: Any) -> float:
    """The weighted Kendall tau between a score and the ground truth, as the transferability literature uses.

    Equals ``scipy.stats.weightedtau(scores, ground_truth).statistic`` with
    scipy's defaults (to rounding, ~1e-16), without needing scipy: weights
    1/(r + 1) by the rank r of each model in the decreasing lexicographic
    order of (scores, ground_truth), a swapped pair weighing the sum of its
    two models' weights, averaged with the same computed with the roles of
    the two sequences exchanged. A swap among the best models thus costs
    more than one among the worst. Ties are treated as scipy treats them
    (tau-b-like normalisation; a joint tie is ranked by position).

    Args:
        scores: one value per model [M] (list, numpy array or tensor),
            larger meaning "predicted to transfer better".
        ground_truth: the models' fine-tuned accuracy [M], in the same order.

    Returns:
        A float in [-1, 1] (1: the same order); NaN when either sequence is
        constant, as in scipy.

    Raises:
        ValueError: different lengths, fewer than 2 models, a NaN, or not 1-D.
        TypeError: values that are not real numbers.
    """
    x, y = _pair(scores, ground_truth)
    return _weighted_tau(x, y, _pair_counts(x, y))


def kendall_tau(scores: Any, ground_truth: Any) -> float:
    """Kendall's tau-b, equal to ``scipy.stats.kendalltau(scores, ground_truth).statistic``.

    Arguments, result and errors as for ``weighted_tau``.
    """
    x, y = _pair(scores, ground_truth)
    return _kendall_tau_b(_pair_counts(x, y))


def spearman(scores: Any, ground_truth: Any) -> float:
    """Spearman's rho, equal to ``scipy.stats.spearmanr(scores, ground_truth).statistic``.

    Arguments, result and errors as for ``weighted_tau``.
    """
    x, y = _pair(scores, ground_truth)
    return _spearman(x, y)


# -- several scores, several tasks ------------------------------------------------------


@dataclass(frozen=True)
class ScoreEvaluation:
    """How one score orders one task's models against the ground truth.

    ``pick`` is the model the score ranks first (ties: the one listed first);
    ``top1`` says whether its ground truth is the best (ties there count).
    """

    weighted_tau: float
    kendall_tau: float
    spearman: float
    top1: bool
    pick: str


@dataclass(frozen=True)
class TaskEvaluation:
    """One task: its name (None for a lone task), models, best model by the ground truth, and each score's results."""

    task: Optional[str]
    models: Tuple[str, ...]
    best: str
    scores: Dict[str, ScoreEvaluation]


def _clean(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


@dataclass(frozen=True)
class Evaluation:
    """Each score's agreement with the ground truth, per task and averaged over tasks.

    ``str(evaluation)`` is a table; ``evaluation.mean[score][metric]`` the
    mean over tasks (for ``top1``, the hit rate); ``evaluation.tasks`` the
    per-task TaskEvaluation; ``to_dict()`` / ``to_json()`` JSON-ready forms;
    ``to_dataframe()`` a pandas DataFrame (pandas needed for that only).
    """

    scores: Tuple[str, ...]
    tasks: Tuple[TaskEvaluation, ...]
    larger_is_better: Dict[str, bool]

    @property
    def mean(self) -> Dict[str, Dict[str, float]]:
        """score -> metric -> mean over tasks (NaN if any task's value is NaN); top1 as the hit rate."""
        return {
            s: {m: float(np.mean([float(getattr(t.scores[s], m)) for t in self.tasks])) for m in METRICS}
            for s in self.scores
        }

    def task(self, name: Optional[str]) -> TaskEvaluation:
        for t in self.tasks:
            if t.task == name:
                return t
        raise KeyError(f"no task {name!r}; the tasks are {[t.task for t in self.tasks]}")

    def __iter__(self) -> Iterator[TaskEvaluation]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def to_dict(self) -> Dict[str, Any]:
        """{"scores", "metrics", "larger_is_better", "tasks": [{"task", "models", "best", "scores": {score:
        {metric: value, "pick": model}}}], "mean": {score: {metric: value}}}. NaN becomes None (JSON null).
        """
        def row(e: ScoreEvaluation) -> Dict[str, Any]:
            return {"weighted_tau": _clean(e.weighted_tau), "kendall_tau": _clean(e.kendall_tau),
                    "spearman": _clean(e.spearman), "top1": e.top1, "pick": e.pick}

        return {
            "scores": list(self.scores),
            "metrics": list(METRICS),
            "larger_is_better": dict(self.larger_is_better),
            "tasks": [
                {"task": t.task, "models": list(t.models), "best": t.best,
                 "scores": {s: row(t.scores[s]) for s in self.scores}}
                for t in self.tasks
            ],
            "mean": {s: {m: _clean(v) for m, v in ms.items()} for s, ms in self.mean.items()},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per (task, score): task, score, models, the metrics, pick.

        The means are ``df.groupby("score")[list(METRICS)].mean()``.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Evaluation.to_dataframe needs pandas: pip install pandas") from None
        rows = [
            {"task": t.task, "score": s, "models": len(t.models),
             **{m: getattr(t.scores[s], m) for m in METRICS}, "pick": t.scores[s].pick}
            for t in self.tasks for s in self.scores
        ]
        return pd.DataFrame(rows, columns=["task", "score", "models", *METRICS, "pick"])

    def plot(
        self,
        metrics: Optional[Sequence[str]] = None,
        *,
        scores: Optional[Sequence[str]] = None,
        ax: Union[Axes, Sequence[Axes], None] = None,
        ncols: Optional[int] = None,
        figsize: Optional[Tuple[float, float]] = None,
        values: bool = True,
    ) -> Tuple[Figure, List[Axes]]:
        """Plot the rank correlations with matplotlib (the ``plot`` extra) as grouped bar charts.

        One task: one panel, a group of bars per score (one bar per metric),
        each score's tick saying whether its pick was the best model (top-1
        hit or miss). Several tasks: one panel per metric, a group of bars
        per task and one for the mean over tasks, one bar (and colour) per
        score. Every correlation is oriented so that 1 means "the same order
        as the ground truth", whatever the score's direction. A NaN value
        (a constant score or ground truth) is an empty bar labelled "n/a".

        Never calls ``plt.show()`` and changes no rcParams.

        Args:
            metrics: statistics from ``METRICS`` ("weighted_tau", "kendall_tau",
                "spearman", "top1"; default: the three rank correlations).
                For "top1" a bar is 1 for a hit and 0 for a miss; its mean is
                the hit rate.
            scores: the scores to plot (default: all of ``self.scores``).
            ax: Axes to draw on: one for one task, one per metric for several
                (a sequence, or the array ``plt.subplots`` returns). Default:
                a new figure.
            ncols: panels per row of a new figure of several tasks (default 1).
            figsize: (width, height) in inches of a new figure (default: from
                the numbers of tasks, scores and metrics).
            values: write each bar's value above it.

        Returns:
            ``(fig, axes)``: the Figure and the list of Axes drawn on (one
            for one task, one per metric for several), as torchmetrics'
            ``Metric.plot`` returns ``(fig, ax)``.

        Raises:
            ImportError: matplotlib is not installed (``pip install "torch_logme[plot]"``).
            ValueError: an unknown or repeated metric or score, or ``ax``
                with another number of Axes than panels.
            TypeError: an ``ax`` that is not matplotlib Axes.
        """
        from .plotting import plot_evaluation  # imports matplotlib

        return plot_evaluation(self, metrics, scores=scores, ax=ax, ncols=ncols, figsize=figsize, values=values)

    def __str__(self) -> str:
        several = len(self.tasks) > 1 or self.tasks[0].task is not None
        header = (["task"] if several else []) + ["score", "models", *METRICS, "pick"]

        def cells(t: TaskEvaluation, s: str) -> List[str]:
            e = t.scores[s]
            return ([str(t.task)] if several else []) + [
                s, str(len(t.models)), f"{e.weighted_tau:.4f}", f"{e.kendall_tau:.4f}", f"{e.spearman:.4f}",
                "yes" if e.top1 else "no", e.pick,
            ]

        rows = [cells(t, s) for t in self.tasks for s in self.scores]
        mean = self.mean
        means = [["mean", s, "", *(f"{mean[s][m]:.4f}" for m in METRICS), ""] for s in self.scores] if several else []
        widths = [max(len(r[i]) for r in [header] + rows + means) for i in range(len(header))]
        left = {0, 1, len(header) - 1} if several else {0, len(header) - 1}  # names left, numbers right

        def line(r: List[str]) -> str:
            padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            return "  ".join(padded).rstrip()

        rule = "-" * len(line(header))
        where = f"{len(self.tasks)} tasks" if len(self.tasks) > 1 else ("1 task" if several else "one task")
        smaller = [s for s in self.scores if not self.larger_is_better[s]]
        direction = f"; smaller is better for {', '.join(smaller)}" if smaller else ""
        means_note = "; mean: over the tasks, top1 as the hit rate" if means else ""
        out = [f"agreement with the ground truth over {where} (1 = same order){direction}{means_note}",
               line(header), rule]
        out += [line(r) for r in rows]
        if means:
            out += [rule, *(line(r) for r in means)]
        return "\n".join(out)


def _parts(*parts: Any) -> str:
    """The non-empty ``parts`` joined by "; " (an empty list stands for a part left out)."""
    return "; ".join(p for p in parts if p)


def _as_mapping(obj: Any, what: str) -> Mapping[Any, Any]:
    """A mapping from ``obj``: a Mapping, a Ranking (model -> scores), or a pandas DataFrame / Series."""
    if isinstance(obj, Ranking):
        # Only the ranked scores: a pooled score's entries also hold its terms ("ncti.seli", ...),
        # which are not scores to evaluate.
        return {e.name: {s: e.scores[s] for s in obj.scores} for e in obj}
    if isinstance(obj, Mapping):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict) and hasattr(obj, "columns"):  # a DataFrame indexed by model, one column per score
        return to_dict(orient="index")
    if callable(to_dict):  # a Series indexed by model
        return to_dict()
    raise TypeError(f"{what} must be a mapping (dict), got {type(obj).__name__}")


def real_number(value: Any, where: str) -> float:
    """A float from a real number, a numpy scalar or a one-element array or tensor; TypeError for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _number(value: Any, where: str) -> float:
    v = real_number(value, where)
    if math.isnan(v):
        raise ValueError(f"{where} is NaN; every value must be a number")
    return v


_Task = Tuple[Optional[str], Mapping[Any, Any], Mapping[Any, Any]]


def _split_tasks(scores_by_model: Any, ground_truth: Any) -> List[_Task]:
    """The (task, scores, ground truth) triples of the three accepted shapes (see ``evaluate_scores``)."""
    if ground_truth is None:
        pairs = _as_mapping(scores_by_model, "scores_by_model")
        tasks: List[_Task] = []
        for task, pair in pairs.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(
                    f"with no ground_truth, scores_by_model maps task -> (scores, ground truth); "
                    f"task {task!r} has a {type(pair).__name__}"
                )
            tasks.append((str(task), pair[0], pair[1]))
        if not tasks:
            raise ValueError("scores_by_model is empty; give at least one task")
        return tasks
    truth = _as_mapping(ground_truth, "ground_truth")
    if not truth:
        raise ValueError("ground_truth is empty; give each model's fine-tuned accuracy")
    nested = [isinstance(v, Mapping) or hasattr(v, "to_dict") for v in truth.values()]
    if not any(nested):
        return [(None, scores_by_model, truth)]
    if not all(nested):
        raise TypeError(
            "ground_truth mixes numbers and mappings: give model -> accuracy, or task -> (model -> accuracy)"
        )
    per_task = _as_mapping(scores_by_model, "scores_by_model")
    missing = [str(t) for t in truth if t not in per_task]
    extra = [str(t) for t in per_task if t not in truth]
    if missing or extra:
        raise ValueError("scores_by_model and ground_truth must cover the same tasks: "
                         + _parts(missing and f"no scores for {missing}", extra and f"no ground truth for {extra}"))
    return [(str(t), per_task[t], truth[t]) for t in per_task]


def _task_table(
    task: Optional[str], scores: Any, truth: Any
) -> Tuple[List[str], List[str], np.ndarray, np.ndarray]:
    """models, score names, values [S, M], ground truth [M] of one task, validated."""
    where = "" if task is None else f"task {task!r}: "
    per_model = _as_mapping(scores, f"{where}scores")
    truth = _as_mapping(truth, f"{where}ground truth")
    models = [str(m) for m in per_model]
    if len(set(models)) != len(models):
        raise ValueError(f"{where}model names clash once made strings: {models}")
    truth_by_name = {str(m): v for m, v in truth.items()}
    no_truth = [m for m in models if m not in truth_by_name]
    no_scores = [m for m in truth_by_name if m not in set(models)]
    if no_truth or no_scores:
        raise ValueError(f"{where}scores and ground truth must cover the same models: "
                         + _parts(no_truth and f"no ground truth for {no_truth}",
                                  no_scores and f"no scores for {no_scores}"))
    if len(models) < 2:
        raise ValueError(f"{where}needs at least 2 models to compare orders, got {len(models)}")

    rows: List[Mapping[Any, Any]] = []
    for m, entry in zip(models, per_model.values()):
        if isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
            rows.append({str(k): v for k, v in _as_mapping(entry, f"{where}model {m!r}").items()})
        else:  # model -> one number: a single score, named "score"
            rows.append({"score": entry})
    names = list(rows[0])
    if not names:
        raise ValueError(f"{where}model {models[0]!r} has no scores")
    for m, row in zip(models, rows):
        if set(row) != set(names):
            lacking = [s for s in names if s not in row]
            more = [s for s in row if s not in names]
            raise ValueError(f"{where}every model needs the same scores; model {m!r} "
                             + _parts(lacking and f"lacks {lacking}", more and f"has extra {more}"))
    values = np.array([[_number(row[s], f"{where}model {m!r}, score {s!r}") for m, row in zip(models, rows)]
                       for s in names], dtype=np.float64).reshape(len(names), len(models))
    y = np.array([_number(truth_by_name[m], f"{where}ground truth of model {m!r}") for m in models], np.float64)
    return models, names, values, y


def evaluate_scores(
    scores_by_model: Any,
    ground_truth: Any = None,
    *,
    larger_is_better: Optional[Mapping[str, bool]] = None,
) -> Evaluation:
    """Check each score's order of the models against their fine-tuned accuracy, on one task or several.

    For every score: the weighted Kendall tau (``weighted_tau``), Kendall's
    tau-b, Spearman's rho (each equal to scipy's), and the top-1 hit: whether
    the model the score ranks first has the best ground truth. A score where
    smaller is better is negated first, so 1 always means "the same order".

    Three shapes:

    - one task: ``scores_by_model`` maps model -> {score name -> value} (or
      model -> value for a single score, named "score"; or a ``Ranking``;
      or a pandas DataFrame indexed by model); ``ground_truth`` maps model ->
      accuracy (or a pandas Series).
    - several tasks: both arguments map task -> the one-task form.
    - several tasks: ``scores_by_model`` maps task -> (scores, ground truth)
      and ``ground_truth`` is omitted.

    Every task must give every model each score and a ground truth, and all
    tasks the same scores (the models may differ between tasks).

    Args:
        scores_by_model: as above.
        ground_truth: as above.
        larger_is_better: score name -> direction, overriding the default:
            ``SCORES[name].larger_is_better`` for a registered score, else True.

    Returns:
        An ``Evaluation``: ``str()`` of it is a table; ``.mean`` the means over
        tasks (NaN propagates: a constant score or ground truth makes the
        rank correlations NaN, as in scipy).

    Raises:
        ValueError: models or scores missing on one side, fewer than 2 models
            in a task, a NaN, or an unknown name in ``larger_is_better``.
        TypeError: a value that is not a number, or an input of another shape.
    """
    tables = [(task, *_task_table(task, s, g)) for task, s, g in _split_tasks(scores_by_model, ground_truth)]
    names = tables[0][2]
    for task, _, other, _, _ in tables[1:]:
        if set(other) != set(names):
            raise ValueError(
                f"every task needs the same scores: task {tables[0][0]!r} has {names}, task {task!r} has {other}"
            )
    override = dict(larger_is_better or {})
    unknown = [s for s in override if s not in names]
    if unknown:
        raise ValueError(f"larger_is_better names scores that are not given: {unknown}; the scores are {names}")
    for s, v in override.items():
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"larger_is_better[{s!r}] must be True or False, got {v!r}")
    direction = {s: bool(override[s]) if s in override else (SCORES[s].larger_is_better if s in SCORES else True)
                 for s in names}

    results = []
    for task, models, task_names, values, y in tables:
        best = models[int(np.argmax(y))]
        per_score = {}
        for s in names:
            x = values[task_names.index(s)]
            x = x if direction[s] else -x
            counts = _pair_counts(x, y)
            pick = int(np.argmax(x))  # ties: the model listed first, as rank_models orders them
            per_score[s] = ScoreEvaluation(
                weighted_tau=_weighted_tau(x, y, counts),
                kendall_tau=_kendall_tau_b(counts),
                spearman=_spearman(x, y),
                top1=bool(y[pick] == y.max()),
                pick=models[pick],
            )
        results.append(TaskEvaluation(task, tuple(models), best, per_score))
    return Evaluation(tuple(names), tuple(results), direction)


# -- the `evaluate` command: CSV files -----------------------------------------------------

_Records = List[Tuple[int, Dict[str, str]]]


def _read_csv(path: Path, what: str) -> Tuple[List[str], Optional[str], str, _Records]:
    """The header, its task column (or None), its model column, and (line, row) records of a CSV file."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            raw = [(reader.line_num, [c.strip() for c in row]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputFileError(f"{path}: cannot read it as a CSV file ({type(err).__name__}: {err})") from None
    raw = [(n, row) for n, row in raw if any(row)]
    if not raw:
        raise InputFileError(f"{path}: is empty; expected a header row ({what})")
    header = raw[0][1]
    if "" in header:
        raise InputFileError(f"{path}: the header has an empty column name (column {header.index('') + 1})")
    lower = [h.lower() for h in header]
    dupes = sorted({h for h in lower if lower.count(h) > 1})
    if dupes:
        raise InputFileError(f"{path}: the header names a column twice: {', '.join(dupes)}")
    if "model" not in lower:
        raise InputFileError(f"{path}: no 'model' column; the header is: {', '.join(header)} (expected {what})")
    task_col = header[lower.index("task")] if "task" in lower else None
    model_col = header[lower.index("model")]
    records: _Records = []
    for n, row in raw[1:]:
        if len(row) != len(header):
            raise InputFileError(f"{path}: line {n} has {len(row)} cells, but the header has {len(header)}")
        record = dict(zip(header, row))
        for col in (task_col, model_col):
            if col is not None and not record[col]:
                raise InputFileError(f"{path}: line {n}: the {col!r} cell is empty")
        records.append((n, record))
    if not records:
        raise InputFileError(f"{path}: has a header but no rows")
    return header, task_col, model_col, records


def _cell(path: Path, line: int, column: str, text: str) -> float:
    if not text:
        raise InputFileError(f"{path}: line {line}, column {column!r}: the cell is empty; expected a number")
    try:
        value = float(text)
    except ValueError:
        raise InputFileError(f"{path}: line {line}, column {column!r}: {text!r} is not a number") from None
    if math.isnan(value):
        raise InputFileError(f"{path}: line {line}, column {column!r}: NaN; every value must be a number")
    return value


_Keyed = Dict[Tuple[Optional[str], str], Tuple[int, Dict[str, str]]]


def _keyed(path: Path, task_col: Optional[str], model_col: str, records: _Records) -> _Keyed:
    """The records by (task, model); InputFileError for a pair given twice."""
    rows: _Keyed = {}
    for n, record in records:
        key = (record[task_col] if task_col else None, record[model_col])
        if key in rows:
            which = f"model {key[1]!r}" + (f" of task {key[0]!r}" if key[0] is not None else "")
            raise InputFileError(f"{path}: {which} appears twice (lines {rows[key][0]} and {n})")
        rows[key] = (n, record)
    return rows


_SCORES_LAYOUT = "columns task (optional), model, then one column per score"
_TRUTH_LAYOUT = "columns task (optional), model, accuracy"


def read_scores_csv(path: Union[str, Path]) -> Tuple[bool, Dict[Optional[str], Dict[str, Dict[str, float]]]]:
    """SCORES.csv -> (has a task column, task -> model -> score name -> value); task None without the column.

    Layout: a header row naming the columns ``task`` (optional), ``model``
    and one column per score (any other name); one row per (task, model).
    """
    path = Path(path)
    header, task_col, model_col, records = _read_csv(path, _SCORES_LAYOUT)
    score_cols = [h for h in header if h not in (task_col, model_col)]
    if not score_cols:
        raise InputFileError(f"{path}: no score columns besides {'task and ' if task_col else ''}model")
    out: Dict[Optional[str], Dict[str, Dict[str, float]]] = {}
    for (task, model), (n, record) in _keyed(path, task_col, model_col, records).items():
        out.setdefault(task, {})[model] = {c: _cell(path, n, c, record[c]) for c in score_cols}
    return task_col is not None, out


def read_ground_truth_csv(path: Union[str, Path]) -> Tuple[bool, Dict[Optional[str], Dict[str, float]]]:
    """GROUND_TRUTH.csv -> (has a task column, task -> model -> accuracy); task None without the column.

    Layout: a header row naming ``task`` (optional), ``model`` and one value
    column (its name is free, e.g. ``accuracy``; with several value columns,
    the one named ``accuracy`` is used); one row per (task, model).
    """
    path = Path(path)
    header, task_col, model_col, records = _read_csv(path, _TRUTH_LAYOUT)
    others = [h for h in header if h not in (task_col, model_col)]
    named = [h for h in others if h.lower() == "accuracy"]
    if len(others) == 1 or named:
        column = others[0] if len(others) == 1 else named[0]
    else:
        got = ", ".join(others) or "none"
        raise InputFileError(f"{path}: expected one value column (e.g. accuracy) besides task and model, got: {got}")
    out: Dict[Optional[str], Dict[str, float]] = {}
    for (task, model), (n, record) in _keyed(path, task_col, model_col, records).items():
        out.setdefault(task, {})[model] = _cell(path, n, column, record[column])
    return task_col is not None, out


def evaluate_files(
    scores_path: Union[str, Path],
    ground_truth_path: Union[str, Path],
    *,
    larger_is_better: Optional[Mapping[str, bool]] = None,
) -> Evaluation:
    """Read SCORES.csv and GROUND_TRUTH.csv (see ``read_scores_csv`` and ``read_ground_truth_csv``) and evaluate.

    Both files have a ``task`` column, or neither. Tasks and models follow
    the order of SCORES.csv.

    Raises:
        InputFileError: naming the file, for an unreadable file, a missing
            column, a cell that is not a number, a (task, model) given twice,
            or a task or model that is in one file but not in the other.
        ValueError: what ``evaluate_scores`` rejects (e.g. a task with one model).
    """
    scores_path, ground_truth_path = Path(scores_path), Path(ground_truth_path)
    scores_tasked, scores = read_scores_csv(scores_path)
    truth_tasked, truth = read_ground_truth_csv(ground_truth_path)
    if scores_tasked != truth_tasked:
        has, lacks = (scores_path, ground_truth_path) if scores_tasked else (ground_truth_path, scores_path)
        raise InputFileError(f"{lacks}: has no 'task' column, but {has} has one; give both files one, or neither")
    tasks_scored = [str(t) for t in scores if t not in truth]
    tasks_known = [str(t) for t in truth if t not in scores]
    if tasks_scored or tasks_known:
        raise InputFileError("tasks differ between the files: " + _parts(
            tasks_scored and f"in {scores_path} only: {', '.join(tasks_scored)}",
            tasks_known and f"in {ground_truth_path} only: {', '.join(tasks_known)}"))
    for task, models in scores.items():
        only_scores = [m for m in models if m not in truth[task]]
        only_truth = [m for m in truth[task] if m not in models]
        if only_scores or only_truth:
            where = f" of task {task!r}" if task is not None else ""
            raise InputFileError(f"the models{where} differ between the files: " + _parts(
                only_scores and f"in {scores_path} only: {', '.join(only_scores)}",
                only_truth and f"in {ground_truth_path} only: {', '.join(only_truth)}"))
    if not scores_tasked:
        return evaluate_scores(scores[None], truth[None], larger_is_better=larger_is_better)
    return evaluate_scores(scores, truth, larger_is_better=larger_is_better)
