"""Ranking.plot, ModelRanking.plot and Evaluation.plot: headless, with the figures closed after each test."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from torch_logme import ModelRanking, evaluate_scores, plotting, rank_models, weighted_tau  # noqa: E402
from torch_logme.ranking import RankedModel, Ranking  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("alpha", "beta", "gamma", "delta", "epsilon")


@pytest.fixture(autouse=True)
def _close_figures():
    before = set(plt.get_fignums())
    yield
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plot called plt.show()")

    monkeypatch.setattr(plt, "show", refuse)


def task(seed=0, n=150, classes=3):
    """Labels and features of five models, from informative to noise (different widths)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    onehot = torch.nn.functional.one_hot(y, classes).double()
    features = {}
    for k, name in enumerate(MODELS):
        signal = onehot @ torch.randn(classes, 4 + k, generator=gen, dtype=torch.float64)
        features[name] = (1.5 - 0.3 * k) * signal + torch.randn(n, 4 + k, generator=gen, dtype=torch.float64)
    return features, y


@pytest.fixture(scope="module")
def ranking():
    features, y = task()
    return rank_models(features, y, ["logme", "h_score", "ncti"])  # ncti: pooled across the models


TRUTH = {"alpha": 0.91, "beta": 0.84, "gamma": 0.86, "delta": 0.62, "epsilon": 0.40}


def values(r, score):
    return np.array([e.scores[score] for e in r])


def bar_order(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def bar_widths(ax):
    """The bars' values, top to bottom."""
    bars = sorted(ax.patches, key=lambda p: p.get_y())
    return [p.get_width() for p in bars]


def title_tau(ax):
    return float(re.search(r"weighted τ = (-?\d\.\d{3})", ax.get_title()).group(1))


def smaller_is_better(monkeypatch, score):
    """Make ``score`` a smaller-is-better score for the plots (every registered score is larger-is-better)."""
    patched = dict(plotting.SCORES)
    patched[score] = dataclasses.replace(patched[score], larger_is_better=False)
    monkeypatch.setattr(plotting, "SCORES", patched)


# -- importing --------------------------------------------------------------------------------------------

def test_import_torch_logme_does_not_import_matplotlib():
    code = (
        "import sys, torch, torch_logme\n"
        "r = torch_logme.rank_models({'a': torch.randn(30, 3), 'b': torch.randn(30, 2)}, torch.arange(30) % 3)\n"
        "e = torch_logme.evaluate_scores(r, {'a': 0.5, 'b': 0.7})\n"
        "str(r), str(e), r.to_dict(), e.to_dict()\n"
        "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_missing_matplotlib_names_the_extra(monkeypatch, ranking):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import matplotlib.pyplot now fails
    with pytest.raises(ImportError, match=re.escape('pip install "torch_logme[plot]"')):
        ranking.plot()
    evaluation = evaluate_scores({n: {"s": v} for n, v in TRUTH.items()}, TRUTH)
    with pytest.raises(ImportError, match=re.escape("torch_logme[plot]")):
        evaluation.plot()


# -- a ranking without ground truth: bars ---------------------------------------------------------------------

def test_bars_one_panel_per_score_best_first(ranking):
    rc = dict(matplotlib.rcParams)
    fig, axes = ranking.plot()
    assert dict(matplotlib.rcParams) == rc
    assert len(axes) == 3 and len(fig.axes) == 3 and all(ax.figure is fig for ax in axes)
    for ax, score in zip(axes, ranking.scores):
        assert ax.get_title() == score
        v = dict(zip(ranking.models, values(ranking, score)))
        order = sorted(ranking.models, key=lambda m: -v[m])
        assert bar_order(ax) == order
        np.testing.assert_allclose(bar_widths(ax), [v[m] for m in order])
    # The pooled score is plotted as the ranking holds it, and says it is pooled.
    assert "pooled over these 5 models" in axes[2].get_xlabel()
    assert bar_order(axes[0]) == ranking.models  # logme orders the ranking


def test_bars_follow_a_smaller_is_better_direction(monkeypatch, ranking):
    smaller_is_better(monkeypatch, "h_score")
    fig, axes = ranking.plot(scores=["h_score", "logme"])
    assert len(axes) == 2
    v = dict(zip(ranking.models, values(ranking, "h_score")))
    assert bar_order(axes[0]) == sorted(ranking.models, key=lambda m: v[m])  # smallest first
    assert "smaller is better" in axes[0].get_xlabel() and "larger is better" in axes[1].get_xlabel()


def test_bars_put_a_nan_score_last():
    r = Ranking(("logme", "gbc"), (
        RankedModel(1, "a", {"logme": 2.0, "gbc": math.nan}),
        RankedModel(2, "b", {"logme": 1.0, "gbc": -3.0}),
        RankedModel(3, "c", {"logme": -1.0, "gbc": -1.0}),
    ))
    fig, axes = r.plot()
    assert bar_order(axes[1]) == ["c", "b", "a"]
    assert "n/a" in [t.get_text() for t in axes[1].texts]
    assert bar_order(axes[0]) == ["a", "b", "c"]


def test_scores_argument_is_checked(ranking):
    with pytest.raises(ValueError, match="does not hold.*'gbc'"):
        ranking.plot(scores=["gbc"])
    with pytest.raises(ValueError, match="repeats"):
        ranking.plot(scores=["logme", "logme"])
    with pytest.raises(ValueError, match="ncols"):
        ranking.plot(ncols=0)


def test_draws_on_given_axes(ranking):
    fig, grid = plt.subplots(1, 2)
    got_fig, axes = ranking.plot(scores=["logme", "ncti"], ax=grid)
    assert got_fig is fig and axes == list(grid)
    assert axes[1].get_title() == "ncti"
    fig1, one = plt.subplots()
    assert ranking.plot(scores="logme", ax=one)[1] == [one]
    with pytest.raises(ValueError, match="3 panel.*needs 3 Axes, got 2"):
        ranking.plot(ax=grid)
    with pytest.raises(TypeError, match="matplotlib Axes"):
        ranking.plot(scores="logme", ax="not axes")


# -- a ranking against ground truth: scatter -------------------------------------------------------------------

def test_scatter_with_weighted_tau_in_titles(ranking):
    fig, axes = ranking.plot(ground_truth=TRUTH, ground_truth_label="accuracy")
    assert len(axes) == 3
    truth = np.array([TRUTH[m] for m in ranking.models])
    for ax, score in zip(axes, ranking.scores):
        assert title_tau(ax) == pytest.approx(weighted_tau(values(ranking, score), truth), abs=5e-4)
        assert ax.get_title().startswith(f"{score}: weighted τ = {weighted_tau(values(ranking, score), truth):.3f}")
        points = ax.collections[0].get_offsets()
        assert len(points) == 5
        np.testing.assert_allclose(np.asarray(points)[:, 0], truth)
        np.testing.assert_allclose(np.asarray(points)[:, 1], values(ranking, score))
        assert sorted(t.get_text() for t in ax.texts) == sorted(MODELS)
        assert ax.get_xlabel() == "accuracy"


def test_scatter_smaller_is_better_negates_the_score_for_tau(monkeypatch, ranking):
    smaller_is_better(monkeypatch, "h_score")
    fig, axes = ranking.plot(ground_truth=TRUTH, scores=["h_score"])
    truth = [TRUTH[m] for m in ranking.models]
    assert title_tau(axes[0]) == pytest.approx(weighted_tau(-values(ranking, "h_score"), truth), abs=5e-4)
    assert axes[0].yaxis_inverted()


def test_scatter_leaves_out_models_without_a_finite_score():
    r = Ranking(("logme",), tuple(RankedModel(i + 1, m, {"logme": v})
                                  for i, (m, v) in enumerate(zip("abcd", [3.0, 2.0, 1.0, math.nan]))))
    fig, axes = r.plot({"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.7})
    assert title_tau(axes[0]) == pytest.approx(1.0)
    assert "1 model without a finite score left out" in axes[0].get_title()
    assert len(axes[0].collections[0].get_offsets()) == 3


def test_overlapping_point_labels_are_moved_apart():
    # Five models close together, two far away: unmoved, the five labels would overlap.
    scores = {f"model number {i}": 1.0 - 1e-3 * i for i in range(5)}
    truth = {f"model number {i}": 0.8 + 1e-3 * i for i in range(5)}
    scores.update(low=-1.0, high=2.0)
    truth.update(low=0.1, high=0.9)
    order = sorted(scores, key=lambda m: -scores[m])
    r = Ranking(("logme",), tuple(RankedModel(i + 1, m, {"logme": scores[m]}) for i, m in enumerate(order)))
    fig, axes = r.plot(truth)
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t) for t in axes[0].texts]  # the text alone, without a leader line
    assert len(boxes) == 7
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)


@pytest.mark.parametrize("truth, error, match", [
    ({**TRUTH, "zeta": 0.5}, ValueError, r"not in the ranking: \['zeta'\]"),
    ({m: v for m, v in TRUTH.items() if m != "beta"}, ValueError, r"lacks models of the ranking: \['beta'\]"),
    ({**TRUTH, "beta": math.nan}, ValueError, r"ground_truth\['beta'\] is nan"),
    ({**TRUTH, "beta": math.inf}, ValueError, r"ground_truth\['beta'\] is inf"),
    ({**TRUTH, "beta": "high"}, TypeError, r"ground_truth\['beta'\]: expected a number"),
    ({**TRUTH, "beta": True}, TypeError, r"expected a number"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], TypeError, r"must map model name"),
])
def test_ground_truth_is_checked_before_drawing(ranking, truth, error, match):
    figures = plt.get_fignums()
    with pytest.raises(error, match=match):
        ranking.plot(ground_truth=truth)
    assert plt.get_fignums() == figures  # nothing was drawn


def test_ground_truth_of_tensors_and_numpy_numbers(ranking):
    truth = {m: torch.tensor(v) if i % 2 else np.float32(v) for i, (m, v) in enumerate(TRUTH.items())}
    fig, axes = ranking.plot(ground_truth=truth, scores="logme")
    expected = weighted_tau(values(ranking, "logme"), [float(np.float32(TRUTH[m])) for m in ranking.models])
    assert title_tau(axes[0]) == pytest.approx(expected, abs=5e-4)


def test_ground_truth_as_a_pandas_series(ranking):
    pd = pytest.importorskip("pandas")
    fig, axes = ranking.plot(ground_truth=pd.Series(TRUTH), scores="logme")
    assert len(axes) == 1


def test_ground_truth_needs_two_models():
    r = Ranking(("logme",), (RankedModel(1, "a", {"logme": 1.0}),))
    with pytest.raises(ValueError, match="at least 2 models"):
        r.plot({"a": 0.5})
    assert len(r.plot()[1]) == 1  # bars need no second model


# -- a ranking of models ---------------------------------------------------------------------------------------

def test_model_ranking_plots_like_a_ranking():
    gen = torch.Generator().manual_seed(0)
    n, classes = 160, 4
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 4, 4, generator=gen)
    x[:, 0] += 0.8 * y[:, None, None].float()
    data = DataLoader(TensorDataset(x, y), batch_size=40)

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))

    r = rank_models({"m0": mlp(0), "m1": mlp(1), "m2": mlp(2)}, data, ["logme", "ncti"], progress=False)
    assert isinstance(r, ModelRanking)
    fig, axes = r.plot()
    assert len(axes) == 2 and bar_order(axes[0]) == r.models
    truth = {"m0": 0.7, "m1": 0.6, "m2": 0.8}
    fig, axes = r.plot(truth)
    t = [truth[m] for m in r.models]
    for ax, score in zip(axes, r.scores):
        assert title_tau(ax) == pytest.approx(weighted_tau(values(r, score), t), abs=5e-4)
    assert type(r).plot is Ranking.plot  # one implementation


# -- an evaluation ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks():
    """Three tasks: task -> (model -> score -> value, model -> accuracy)."""
    out = {}
    for k, name in enumerate(("cars", "pets", "birds")):
        features, y = task(seed=k + 1)
        r = rank_models(features, y, ["logme", "h_score", "gbc"])
        rng = np.random.default_rng(k)
        truth = {m: float(v) for m, v in zip(MODELS, np.linspace(0.9, 0.5, 5) + rng.normal(0, 0.08, 5))}
        out[name] = ({e.name: {s: e.scores[s] for s in r.scores} for e in r}, truth)
    return out


def bar_heights(ax, series):
    """Heights of the bars of legend entry ``series`` (its container), left to right."""
    for container in ax.containers:
        if container.get_label() == series:
            return [p.get_height() for p in container]
    raise KeyError(series)


def test_evaluation_of_one_task(tasks):
    scores, truth = tasks["cars"]
    evaluation = evaluate_scores(scores, truth)
    fig, axes = evaluation.plot()
    assert len(axes) == 1 and len(fig.axes) == 1
    ax = axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert [label.split("\n")[0] for label in labels] == list(evaluation.scores)
    for s, label in zip(evaluation.scores, labels):
        assert ("hit" if evaluation.tasks[0].scores[s].top1 else "miss") in label
    for metric, name in plotting.METRIC_LABELS.items():
        if metric == "top1":
            continue
        expected = [getattr(evaluation.tasks[0].scores[s], metric) for s in evaluation.scores]
        np.testing.assert_allclose(bar_heights(ax, name), expected)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [plotting.METRIC_LABELS[m]
                                                                    for m in plotting.DEFAULT_METRICS]


def test_evaluation_of_several_tasks(tasks):
    evaluation = evaluate_scores(tasks)
    fig, axes = evaluation.plot()
    assert len(axes) == 3 and len(fig.axes) == 3
    for ax, metric in zip(axes, plotting.DEFAULT_METRICS):
        assert plotting.METRIC_LABELS[metric] in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["cars", "pets", "birds", "mean"]
        for s in evaluation.scores:
            expected = [getattr(t.scores[s], metric) for t in evaluation.tasks] + [evaluation.mean[s][metric]]
            np.testing.assert_allclose(bar_heights(ax, s), expected)
    fig, axes = evaluation.plot(["top1", "weighted_tau"], scores=["gbc", "logme"])
    assert len(axes) == 2
    top1 = [float(t.scores["gbc"].top1) for t in evaluation.tasks] + [evaluation.mean["gbc"]["top1"]]
    np.testing.assert_allclose(bar_heights(axes[0], "gbc"), top1)
    with pytest.raises(ValueError, match="needs 2 Axes, got 1"):
        evaluation.plot(["top1", "weighted_tau"], ax=plt.subplots()[1])


def test_evaluation_nan_is_an_empty_bar():
    evaluation = evaluate_scores({"a": {"s": 1.0, "flat": 2.0}, "b": {"s": 2.0, "flat": 2.0},
                                  "c": {"s": 3.0, "flat": 2.0}}, {"a": 0.1, "b": 0.2, "c": 0.3})
    fig, axes = evaluation.plot(values=True)
    assert bar_heights(axes[0], plotting.METRIC_LABELS["weighted_tau"]) == [1.0, 0.0]
    assert "n/a" in [t.get_text() for t in axes[0].texts]


def test_evaluation_arguments_are_checked(tasks):
    evaluation = evaluate_scores(tasks)
    with pytest.raises(ValueError, match="metric"):
        evaluation.plot(["pearson"])
    with pytest.raises(ValueError, match="does not hold"):
        evaluation.plot(scores=["nce"])
    with pytest.raises(ValueError, match="at least one metric"):
        evaluation.plot([])
