"""Plots of a :class:`~torch_logme.ranking.Ranking` and an :class:`~torch_logme.evaluation.Evaluation`.

``Ranking.plot()`` (and so ``ModelRanking.plot()``) and ``Evaluation.plot()``
call the functions here; this module is imported only by them, so
``import torch_logme`` never imports matplotlib. matplotlib is the optional
``plot`` extra: ``pip install "torch_logme[plot]"``.

Every plot returns ``(fig, axes)``: the matplotlib Figure and a list of the
Axes drawn on, one per panel (as torchmetrics' ``Metric.plot`` returns
``(fig, ax)``). Nothing here calls ``plt.show()`` or changes rcParams: save
the figure with ``fig.savefig(...)``, or show it with ``plt.show()``; in a
notebook it shows by itself. Given ``ax=``, the plot draws on those Axes
(one per panel) and creates no figure.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .registry import SCORES

if TYPE_CHECKING:  # only for the annotations: matplotlib is imported when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .evaluation import Evaluation
    from .ranking import Ranking

__all__ = ["plot_ranking", "plot_evaluation", "INSTALL_HINT"]

#: What to run when matplotlib is missing.
INSTALL_HINT = 'pip install "torch_logme[plot]"'

#: How each statistic of an Evaluation is named on a plot.
METRIC_LABELS = {
    "weighted_tau": "weighted Kendall τ",
    "kendall_tau": "Kendall τ-b",
    "spearman": "Spearman ρ",
    "top1": "top-1 hit",
}

#: The statistics an Evaluation plot shows unless told otherwise.
DEFAULT_METRICS = ("weighted_tau", "kendall_tau", "spearman")

AxesArg = Union["Axes", Sequence["Axes"], None]


def _pyplot() -> Any:
    """matplotlib.pyplot, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from err
    return plt


def _larger_is_better(score: str) -> bool:
    spec = SCORES.get(score)
    return True if spec is None else spec.larger_is_better


def _direction(larger: bool) -> str:
    return "larger is better" if larger else "smaller is better"


# -- arguments, checked before anything is drawn --------------------------------------------------------------

def _given_axes(ax: AxesArg, panels: int) -> Optional[List[Axes]]:
    """The Axes given as ``ax`` as a list of ``panels`` Axes, or None when none were given."""
    if ax is None:
        return None
    from matplotlib.axes import Axes  # matplotlib is importable: the caller made these Axes

    given: List[Any] = [ax] if isinstance(ax, Axes) else list(np.asarray(ax, dtype=object).ravel())
    bad = [type(a).__name__ for a in given if not isinstance(a, Axes)]
    if bad:
        raise TypeError(f"ax must be a matplotlib Axes or a sequence of them, got {', '.join(bad)}")
    if len(given) != panels:
        raise ValueError(f"this plot has {panels} panel(s), so ax needs {panels} Axes, got {len(given)}")
    return given


def _new_axes(panels: int, ncols: Optional[int], panel_size: Tuple[float, float],
              figsize: Optional[Tuple[float, float]]) -> Tuple[Figure, List[Axes]]:
    """A new figure (constrained layout) with ``panels`` Axes in rows of ``ncols``; spare cells are removed."""
    plt = _pyplot()
    cols = max(1, min(panels, ncols or panels))
    rows = math.ceil(panels / cols)
    size = figsize or (panel_size[0] * cols, panel_size[1] * rows)
    fig, grid = plt.subplots(rows, cols, figsize=size, layout="constrained", squeeze=False)
    cells = list(grid.ravel())
    for spare in cells[panels:]:
        spare.remove()
    return fig, cells[:panels]


def _check_ncols(ncols: Optional[int]) -> None:
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")


def _chosen(requested: Optional[Sequence[str]], available: Sequence[str], what: str, kind: str) -> List[str]:
    """``requested`` names checked against ``available`` (all of them when None), in the order given."""
    if requested is None:
        return list(available)
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise ValueError(f"{what} must name at least one {kind}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"{what} names {kind}s this result does not hold: {unknown}; it holds {list(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} repeats a {kind}: {names}")
    return names


def _value(value: Any, where: str) -> float:
    """A finite real number from a Python or numpy number, or a one-element array or tensor."""
    from .evaluation import real_number

    v = real_number(value, where)
    if not math.isfinite(v):
        raise ValueError(f"{where} is {v}; every ground-truth value must be a finite number")
    return v


def _ground_truth(ground_truth: Any, models: Sequence[str]) -> np.ndarray:
    """The ground truth of ``models``, in their order, from a mapping model -> value (or a pandas Series)."""
    if not isinstance(ground_truth, Mapping):
        to_dict = getattr(ground_truth, "to_dict", None)
        if not callable(to_dict) or hasattr(ground_truth, "columns"):
            raise TypeError(
                f"ground_truth must map model name -> value (a dict or a pandas Series), "
                f"got {type(ground_truth).__name__}"
            )
        ground_truth = to_dict()
    truth = {str(k): v for k, v in ground_truth.items()}
    if len(truth) != len(ground_truth):
        raise ValueError("ground_truth names a model twice once its keys are made strings")
    unknown = [m for m in truth if m not in set(models)]
    if unknown:
        raise ValueError(f"ground_truth names models that are not in the ranking: {unknown}; "
                         f"the ranking holds {list(models)}")
    missing = [m for m in models if m not in truth]
    if missing:
        raise ValueError(f"ground_truth lacks models of the ranking: {missing}; give every ranked model a value")
    if len(models) < 2:
        raise ValueError(f"comparing a ranking with the ground truth needs at least 2 models, got {len(models)}")
    return np.array([_value(truth[m], f"ground_truth[{m!r}]") for m in models], dtype=np.float64)


# -- the ranking ----------------------------------------------------------------------------------------------

def _score_values(ranking: Ranking, score: str) -> np.ndarray:
    """The score of each model, in the ranking's order; NaN where a row lacks it."""
    return np.array([float(e.scores.get(score, math.nan)) for e in ranking.entries], dtype=np.float64)


def _best_first(values: np.ndarray, larger: bool) -> List[int]:
    """Indices of ``values``, best first; non-finite values last; ties keep their order."""
    finite = [i for i in range(values.size) if math.isfinite(values[i])]
    finite.sort(key=lambda i: -values[i] if larger else values[i])  # stable
    return finite + [i for i in range(values.size) if not math.isfinite(values[i])]


def _pooled_note(score: str, models: int) -> str:
    spec = SCORES.get(score)
    return f"\n(pooled over these {models} models)" if spec is not None and spec.pooled else ""


def _bars(ax: Axes, ranking: Ranking, score: str, color: str) -> None:
    models = ranking.models
    values = _score_values(ranking, score)
    larger = _larger_is_better(score)
    order = _best_first(values, larger)
    shown = np.array([values[i] if math.isfinite(values[i]) else 0.0 for i in order])
    ax.barh(range(len(order)), shown, color=color, height=0.7)
    low, high = min(0.0, float(shown.min())), max(0.0, float(shown.max()))
    span = (high - low) or 1.0
    for row, (i, v) in enumerate(zip(order, shown)):
        # The value beside its bar's end; beside the zero line for a negative bar, so that it never
        # runs into the model names on the left.
        text = f"{values[i]:.3g}" if math.isfinite(values[i]) else "n/a"
        ax.annotate(text, (max(float(v), 0.0), row), xytext=(3, 0), textcoords="offset points",
                    ha="left", va="center", fontsize=8)
    ax.set_xlim(low - 0.04 * span, high + 0.3 * span)  # room for the values on the right
    ax.set_yticks(range(len(order)), [models[i] for i in order])
    ax.set_ylim(len(order) - 0.5, -0.5)  # the best at the top
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_title(score)
    ax.set_xlabel(f"score, {_direction(larger)}{_pooled_note(score, len(models))}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _weighted_tau_of(values: np.ndarray, truth: np.ndarray, larger: bool) -> float:
    from .evaluation import weighted_tau

    if values.size < 2:
        return math.nan
    return weighted_tau(values if larger else -values, truth)


_POINT_LABEL: Any = {"textcoords": "offset points", "va": "bottom", "fontsize": 8}


def _scatter(ax: Axes, ranking: Ranking, score: str, truth: np.ndarray, truth_label: str,
             color: str) -> List[Any]:
    """One score against the ground truth, the weighted tau in the title; returns the points' labels."""
    models = ranking.models
    values = _score_values(ranking, score)
    larger = _larger_is_better(score)
    keep = np.isfinite(values)
    x, y = truth[keep], values[keep]
    names = [m for m, k in zip(models, keep) if k]
    tau = _weighted_tau_of(y, x, larger)
    ax.scatter(x, y, color=color, zorder=3)
    middle = (x.min() + x.max()) / 2 if x.size else 0.0
    labels = []
    for xi, yi, name in zip(x, y, names):
        # Labels point inwards, so that those of the outermost points stay inside the panel.
        right = bool(xi > middle)
        labels.append(ax.annotate(name, (xi, yi), xytext=(-5 if right else 5, 4), ha="right" if right else "left",
                                  **_POINT_LABEL))
    ax.margins(x=0.08, y=0.12)
    if not larger:
        ax.invert_yaxis()  # the better scores at the top, as for the others
    title = f"{score}: weighted τ = {tau:.3f}" if math.isfinite(tau) else f"{score}: weighted τ = n/a"
    left_out = int((~keep).sum())
    if left_out:
        title += f"\n({left_out} model{'s' if left_out > 1 else ''} without a finite score left out)"
    ax.set_title(title)
    ax.set_xlabel(truth_label)
    ax.set_ylabel(f"score, {_direction(larger)}{_pooled_note(score, len(models))}")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return labels


def _separate(fig: Figure, labels_per_axes: Sequence[Sequence[Any]]) -> None:
    """Move overlapping point labels down, each below the ones above it, with a leader line when moved far.

    Measured on the laid-out figure (one draw without output), so the labels
    are apart at the figure's size and dpi.
    """
    draw = getattr(fig, "draw_without_rendering", None)  # matplotlib >= 3.6
    if callable(draw):
        draw()
    else:
        fig.canvas.draw()
    points_per_pixel = 72.0 / fig.dpi
    for labels in labels_per_axes:
        boxes = sorted(((a, a.get_window_extent()) for a in labels), key=lambda ab: -ab[1].y1)  # top first
        placed: List[Tuple[float, float, float, float]] = []
        for ann, box in boxes:
            shift = 0.0  # pixels down
            moved = True
            while moved:  # the shift only grows, so this ends
                moved = False
                for x0, y0, x1, y1 in placed:
                    if box.x0 < x1 and x0 < box.x1 and box.y0 - shift < y1 and y0 < box.y1 - shift:
                        shift = box.y1 - y0 + 2.0
                        moved = True
            placed.append((box.x0, box.y0 - shift, box.x1, box.y1 - shift))
            if shift == 0.0:
                continue
            dx, dy = ann.xyann
            offset = (dx, dy - shift * points_per_pixel)
            leader = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 3}
            ax = ann.axes
            ann.remove()
            ax.annotate(ann.get_text(), ann.xy, xytext=offset, ha=ann.get_horizontalalignment(),
                        arrowprops=leader if shift * points_per_pixel > 6 else None,
                        **_POINT_LABEL)


def plot_ranking(
    ranking: Ranking,
    ground_truth: Optional[Mapping[str, float]] = None,
    *,
    scores: Optional[Sequence[str]] = None,
    ax: AxesArg = None,
    ncols: Optional[int] = None,
    figsize: Optional[Tuple[float, float]] = None,
    ground_truth_label: str = "ground truth (e.g. fine-tuned accuracy)",
) -> Tuple[Figure, List[Axes]]:
    """Plot a ranking: one panel per score. See :meth:`torch_logme.ranking.Ranking.plot`."""
    _check_ncols(ncols)
    if not ranking.entries:
        raise ValueError("the ranking holds no models: nothing to plot")
    names = _chosen(scores, ranking.scores, "scores", "score")
    truth = None if ground_truth is None else _ground_truth(ground_truth, ranking.models)
    given = _given_axes(ax, len(names))
    if given is None:
        longest = max(len(m) for m in ranking.models)
        if truth is None:
            # Room for the model names beside the bars, and 0.3 inch per bar.
            panel = (3.0 + 0.065 * longest, 1.1 + 0.3 * len(ranking))
            fig, axes = _new_axes(len(names), ncols or min(len(names), 2), panel, figsize)
        else:
            fig, axes = _new_axes(len(names), ncols or min(len(names), 2), (5.2, 4.2), figsize)
    else:
        axes = given
        fig = axes[0].figure  # type: ignore[assignment]
    labels = []
    for i, (panel_ax, score) in enumerate(zip(axes, names)):
        color = f"C{i % 10}"
        if truth is None:
            _bars(panel_ax, ranking, score, color)
        else:
            labels.append(_scatter(panel_ax, ranking, score, truth, ground_truth_label, color))
    if labels:
        _separate(fig, labels)
    return fig, axes


# -- the evaluation -------------------------------------------------------------------------------------------

def _grouped_bars(ax: Axes, groups: Sequence[str], series: Sequence[Tuple[str, Sequence[float]]],
                  label_values: bool) -> None:
    """Bars of each series side by side within each group; NaN bars are left empty and labelled n/a."""
    width = 0.8 / len(series)
    centres = np.arange(len(groups), dtype=np.float64)
    for k, (name, values) in enumerate(series):
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(centres - 0.4 + width * (k + 0.5), shown, width=width, label=name, color=f"C{k % 10}")
        if label_values:
            labels = [f"{v:.2f}" if math.isfinite(v) else "n/a" for v in values]
            ax.bar_label(bars, labels=labels, padding=2, fontsize=7)
    ax.set_xticks(centres, list(groups))
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    negative = any(v < 0 for _, vs in series for v in vs)  # NaN compares False
    ax.set_ylim(-1.12 if negative else 0.0, 1.15)  # the full range only when some value needs it
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_evaluation(
    evaluation: Evaluation,
    metrics: Optional[Sequence[str]] = None,
    *,
    scores: Optional[Sequence[str]] = None,
    ax: AxesArg = None,
    ncols: Optional[int] = None,
    figsize: Optional[Tuple[float, float]] = None,
    values: bool = True,
) -> Tuple[Figure, List[Axes]]:
    """Plot an evaluation. See :meth:`torch_logme.evaluation.Evaluation.plot`."""
    from .evaluation import METRICS

    _check_ncols(ncols)
    chosen_metrics = _chosen(DEFAULT_METRICS if metrics is None else metrics, METRICS, "metrics", "metric")
    names = _chosen(scores, evaluation.scores, "scores", "score")
    several = len(evaluation.tasks) > 1
    panels = len(chosen_metrics) if several else 1
    given = _given_axes(ax, panels)
    if given is None:
        shown = [float(getattr(t.scores[s], m)) for t in evaluation.tasks for s in names for m in chosen_metrics]
        height = 3.4 if any(v < 0 for v in shown) else 2.6  # the negative half only when some value is there
        legend = 1.3  # inches right of the panels
        if several:
            columns = len(evaluation.tasks) + 1
            panel = (legend + 0.8 + columns * (0.35 + 0.2 * len(names)), height)
            fig, axes = _new_axes(panels, ncols or 1, panel, figsize)
        else:
            panel = (legend + 0.8 + len(names) * (0.45 + 0.3 * len(chosen_metrics)), height + 0.4)
            fig, axes = _new_axes(1, 1, panel, figsize)
    else:
        axes = given
        fig = axes[0].figure  # type: ignore[assignment]

    def metric_of(task: Any, score: str, metric: str) -> float:
        return float(getattr(task.scores[score], metric))

    if not several:
        task = evaluation.tasks[0]
        ax0 = axes[0]
        series = [(METRIC_LABELS[m], [metric_of(task, s, m) for s in names]) for m in chosen_metrics]
        ticks = [f"{s}\n(top-1 {'hit' if task.scores[s].top1 else 'miss'})" for s in names]
        _grouped_bars(ax0, ticks, series, values)
        where = "" if task.task is None else f"task {task.task}, "
        ax0.set_title(f"agreement with the ground truth ({where}{len(task.models)} models)")
        ax0.set_ylabel("rank correlation (1 = same order)")
        ax0.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig, axes

    mean = evaluation.mean
    groups = [str(t.task) for t in evaluation.tasks] + ["mean"]
    for panel_ax, metric in zip(axes, chosen_metrics):
        series = [(s, [metric_of(t, s, metric) for t in evaluation.tasks] + [mean[s][metric]]) for s in names]
        _grouped_bars(panel_ax, groups, series, values)
        panel_ax.axvline(len(evaluation.tasks) - 0.5, color="0.5", linestyle="--", linewidth=0.8)
        what = "top-1 hit (1) or miss (0); mean: hit rate" if metric == "top1" else "1 = same order"
        panel_ax.set_title(f"{METRIC_LABELS[metric]} per task ({what})")
        panel_ax.set_ylabel(METRIC_LABELS[metric])
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="score", title_fontsize=8)
    return fig, axes

