"""weighted_tau, evaluate_scores and the `evaluate` command: parity with scipy.stats, shapes, errors, the CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch

import torch_logme
from torch_logme import Evaluation, evaluate_scores, rank_models, weighted_tau
from torch_logme import evaluation as ev
from torch_logme.__main__ import main
from torch_logme.ranking import InputFileError

from conftest import make_features

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12


def _scipy():
    return pytest.importorskip("scipy.stats")


def _reference(x, y):
    """scipy's (weighted tau, tau-b, rho); its constant-input warning silenced (NaN is checked instead)."""
    stats = _scipy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (float(stats.weightedtau(x, y).statistic), float(stats.kendalltau(x, y).statistic),
                float(stats.spearmanr(x, y).statistic))


def _ours(x, y):
    return weighted_tau(x, y), ev.kendall_tau(x, y), ev.spearman(x, y)


def _same(ours, theirs, tol=TOL):
    for a, b in zip(ours, theirs):
        if math.isnan(b):
            assert math.isnan(a), (ours, theirs)
        else:
            assert abs(a - b) <= tol, (ours, theirs)


def _draw(rng, n, kind):
    """Two sequences of n values with the ties that ``kind`` names."""
    if kind == "distinct":
        return rng.standard_normal(n), rng.standard_normal(n)
    if kind == "ties_x":
        return rng.integers(0, max(2, n // 3), n).astype(np.float64), rng.standard_normal(n)
    if kind == "ties_y":
        return rng.standard_normal(n), rng.integers(0, 3, n).astype(np.float64)
    if kind == "ties_both":
        return rng.integers(0, 3, n), rng.integers(0, 4, n)
    if kind == "joint":  # many pairs tied in x and y at once
        x = rng.integers(0, 3, n)
        y = x * 10 + (rng.random(n) < 0.3)
        return x.astype(np.float64), y.astype(np.float64)
    if kind == "correlated":
        x = rng.standard_normal(n)
        return np.round(x, 1), np.round(x + 0.3 * rng.standard_normal(n), 1)
    raise AssertionError(kind)


KINDS = ("distinct", "ties_x", "ties_y", "ties_both", "joint", "correlated")


# -- parity with scipy ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_matches_scipy_on_random_data(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(60):
        n = int(rng.integers(2, 40))
        x, y = _draw(rng, n, kind)
        _same(_ours(x, y), _reference(x, y))
        _same(_ours(y, x), _reference(y, x))


def test_matches_scipy_for_small_exhaustive_cases():
    # Pairs of sequences over {0, 1, 2}: every pair of length 2, a sample of lengths 3 and 4,
    # so every tie pattern (constant sequences included) shows up.
    import itertools

    rng = np.random.default_rng(11)
    for n, pairs in ((2, None), (3, 150), (4, 150)):
        seqs = [np.array(s) for s in itertools.product(range(3), repeat=n)]
        every = list(itertools.product(seqs, seqs))
        chosen = every if pairs is None else [every[i] for i in rng.choice(len(every), pairs, replace=False)]
        for x, y in chosen:
            _same(_ours(x, y), _reference(x, y))


def test_matches_scipy_on_many_models_in_blocks(monkeypatch):
    stats = _scipy()
    rng = np.random.default_rng(7)
    x = rng.integers(0, 50, 1500).astype(np.float64)
    y = x + rng.integers(0, 40, 1500)
    monkeypatch.setattr(ev, "_BLOCK_ELEMENTS", 10_000)  # several row blocks
    _same(_ours(x, y), _reference(x, y))
    assert abs(weighted_tau(x, y) - stats.weightedtau(x, y).statistic) <= TOL


def test_dtypes_and_containers_match_scipy():
    rng = np.random.default_rng(3)
    x, y = _draw(rng, 25, "ties_both")
    expected = _reference(x.astype(np.float64), y.astype(np.float64))
    for a, b in [
        (x.tolist(), y.tolist()),
        (x.astype(np.int32), y.astype(np.float32)),
        (torch.from_numpy(x), torch.from_numpy(y).float()),
        (torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(y).half()),
        (torch.from_numpy(x), y.astype(np.uint8)),
    ]:
        _same(_ours(a, b), expected)
    _same(_ours(x > 1, y), _reference((x > 1).astype(np.int64), y))  # booleans count as 0 / 1


def test_float32_values_compare_as_float32():
    # Distinct as float64 but tied once stored as float32: the stored values decide, as in scipy.
    x = np.array([1.0, 1.0 + 1e-9, 2.0, 0.5], dtype=np.float64).astype(np.float32)
    y = np.array([3.0, 1.0, 2.0, 4.0])
    _same(_ours(x, y), _reference(x, y))


def test_infinite_values_are_ordered_not_nan():
    x = np.array([-np.inf, 0.0, np.inf, np.inf, 1.0])
    y = np.array([1.0, 2.0, 5.0, 4.0, 3.0])
    ours = _ours(x, y)
    assert not any(math.isnan(v) for v in ours)
    _same(ours, _reference(x, y))


def test_published_examples():
    # The examples of scipy.stats' documentation, with their printed values.
    x, y = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
    assert weighted_tau(x, y) == pytest.approx(-0.56694968153682723, abs=TOL)
    assert ev.kendall_tau(x, y) == pytest.approx(-0.47140452079103173, abs=TOL)
    assert ev.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.82078268166812329, abs=TOL)


def test_perfect_and_reversed_orders():
    acc = [70.0, 80.0, 75.0, 90.0]
    assert _ours([1, 3, 2, 4], acc) == (1.0, 1.0, 1.0)
    assert _ours([4, 2, 3, 1], acc) == (-1.0, -1.0, -1.0)


def test_a_swap_at_the_top_costs_more():
    acc = np.arange(6, dtype=float)
    top = np.array([0, 1, 2, 3, 5, 4.0])     # the two best swapped
    bottom = np.array([1, 0, 2, 3, 4, 5.0])  # the two worst swapped
    assert ev.kendall_tau(top, acc) == ev.kendall_tau(bottom, acc)
    assert weighted_tau(top, acc) < weighted_tau(bottom, acc)


def test_constant_input_gives_nan_as_scipy():
    for x, y in [([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [5, 5, 5]), ([2, 2], [2, 2])]:
        assert all(math.isnan(v) for v in _ours(x, y))


def test_hypothesis_small_integer_sequences():
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    _scipy()

    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @hypothesis.given(strategies.integers(2, 12).flatmap(
        lambda n: strategies.tuples(*(strategies.lists(strategies.integers(-3, 3), min_size=n, max_size=n),) * 2)))
    def check(pair):
        x, y = (np.array(v) for v in pair)
        _same(_ours(x, y), _reference(x, y))

    check()


# -- bad inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [weighted_tau, ev.kendall_tau, ev.spearman])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="same length.*3 and 2"):
        fn([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        fn([1.0], [2.0])
    with pytest.raises(ValueError, match="at least 2"):
        fn([], [])
    with pytest.raises(ValueError, match="scores holds NaN at position.*1"):
        fn([1.0, float("nan"), 2.0], [1, 2, 3])
    with pytest.raises(ValueError, match="ground_truth holds NaN"):
        fn([1, 2, 3], torch.tensor([1.0, 2.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(TypeError, match="real numbers"):
        fn(["a", "b"], [1, 2])
    with pytest.raises(TypeError, match="real numbers"):
        fn(np.array([1j, 2j]), [1, 2])


def test_inputs_are_not_modified():
    x = torch.tensor([3.0, 1.0, 2.0])
    y = np.array([1.0, 3.0, 2.0])
    x0, y0 = x.clone(), y.copy()
    weighted_tau(x, y)
    evaluate_scores({"a": {"s": x[0]}, "b": {"s": x[1]}, "c": {"s": x[2]}}, dict(zip("abc", y)))
    assert torch.equal(x, x0) and np.array_equal(y, y0)


# -- evaluate_scores ---------------------------------------------------------------------

# A table in the published style: per task, each model's fine-tuned accuracy and its scores.
TABLE = {
    "aircraft": {
        "resnet50": (84.2, {"logme": 0.946, "leep": -2.01, "dist": 3.1}),
        "densenet169": (84.9, {"logme": 0.950, "leep": -1.99, "dist": 2.9}),
        "mobilenet_v2": (82.0, {"logme": 0.934, "leep": -2.20, "dist": 3.4}),
        "inception_v3": (84.8, {"logme": 0.953, "leep": -2.05, "dist": 3.1}),
        "googlenet": (80.3, {"logme": 0.924, "leep": -2.30, "dist": 4.0}),
    },
    "pets": {
        "resnet50": (92.5, {"logme": 1.101, "leep": -0.92, "dist": 1.2}),
        "densenet169": (93.1, {"logme": 1.115, "leep": -0.89, "dist": 1.1}),
        "mobilenet_v2": (90.9, {"logme": 1.098, "leep": -0.95, "dist": 1.5}),
        "inception_v3": (93.1, {"logme": 1.120, "leep": -0.90, "dist": 1.0}),
        "googlenet": (89.2, {"logme": 1.050, "leep": -1.10, "dist": 1.7}),
    },
    "dtd": {
        "resnet50": (75.0, {"logme": 0.75, "leep": -3.1, "dist": 2.0}),
        "densenet169": (74.1, {"logme": 0.75, "leep": -3.0, "dist": 2.0}),
        "mobilenet_v2": (73.9, {"logme": 0.74, "leep": -3.3, "dist": 2.5}),
        "inception_v3": (71.2, {"logme": 0.72, "leep": -3.2, "dist": 2.2}),
        "googlenet": (72.0, {"logme": 0.70, "leep": -3.4, "dist": 2.2}),
    },
}
SCORE_NAMES = ("logme", "leep", "dist")


def _split(table):
    scores = {t: {m: s for m, (_, s) in rows.items()} for t, rows in table.items()}
    truth = {t: {m: a for m, (a, _) in rows.items()} for t, rows in table.items()}
    return scores, truth


def test_table_matches_scipy_per_task_and_on_average():
    scores, truth = _split(TABLE)
    result = evaluate_scores(scores, truth, larger_is_better={"dist": False})
    assert isinstance(result, Evaluation)
    assert [t.task for t in result.tasks] == list(TABLE) and result.scores == SCORE_NAMES
    for t in result.tasks:
        models = list(TABLE[t.task])
        acc = [truth[t.task][m] for m in models]
        assert t.models == tuple(models) and t.best == models[int(np.argmax(acc))]
        for s in SCORE_NAMES:
            sign = -1.0 if s == "dist" else 1.0
            x = [sign * scores[t.task][m][s] for m in models]
            e = t.scores[s]
            _same((e.weighted_tau, e.kendall_tau, e.spearman), _reference(x, acc))
            assert e.weighted_tau == weighted_tau(x, acc)
            pick = models[int(np.argmax(x))]
            assert e.pick == pick and e.top1 == (truth[t.task][pick] == max(acc))
    for s in SCORE_NAMES:
        for m in ev.METRICS:
            values = [float(getattr(t.scores[s], m)) for t in result.tasks]
            assert result.mean[s][m] == pytest.approx(np.mean(values), abs=1e-15)
    # pets: densenet169 and inception_v3 tie for the best accuracy; logme's pick is one of them.
    assert result.task("pets").scores["logme"].pick == "inception_v3" and result.task("pets").scores["logme"].top1
    # dtd: logme ties resnet50 and densenet169 at the top; the one listed first is its pick (a hit).
    assert result.task("dtd").scores["logme"].pick == "resnet50" and result.task("dtd").scores["logme"].top1


def test_table_prints_in_the_ranking_style():
    scores, truth = _split(TABLE)
    text = str(evaluate_scores(scores, truth, larger_is_better={"dist": False}))
    lines = text.splitlines()
    assert lines[0].startswith("agreement with the ground truth over 3 tasks (1 = same order)")
    assert "smaller is better for dist" in lines[0] and "hit rate" in lines[0]
    assert lines[1].split() == ["task", "score", "models", "weighted_tau", "kendall_tau", "spearman", "top1", "pick"]
    assert set(lines[2]) == {"-"} and len(lines[2]) == len(lines[1])
    body = lines[3:3 + 9]
    assert [r.split()[:2] for r in body] == [[t, s] for t in TABLE for s in SCORE_NAMES]
    assert set(lines[12]) == {"-"}
    assert [r.split()[:2] for r in lines[13:]] == [["mean", s] for s in SCORE_NAMES]
    assert all(r.split()[6] in ("yes", "no") for r in body)
    # Numbers right-aligned: every row ends its weighted_tau column where the header does.
    end = lines[1].index("weighted_tau") + len("weighted_tau")
    assert all(r[end - 1] != " " and r[end] == " " for r in lines[3:] if not set(r) == {"-"})


def test_single_task_and_other_shapes_agree():
    scores, truth = _split(TABLE)
    single = evaluate_scores(scores["aircraft"], truth["aircraft"])
    assert len(single) == 1 and single.tasks[0].task is None
    assert "task" not in str(single).splitlines()[1].split()
    assert "mean" not in str(single)
    nested = evaluate_scores(scores, truth)
    pairs = evaluate_scores({t: (scores[t], truth[t]) for t in TABLE})
    assert nested.to_dict() == pairs.to_dict()
    assert single.tasks[0].scores == nested.task("aircraft").scores
    # one number per model: a single score named "score"
    lone = evaluate_scores({m: s["logme"] for m, s in scores["pets"].items()}, truth["pets"])
    assert lone.scores == ("score",)
    assert lone.tasks[0].scores["score"] == nested.task("pets").scores["logme"]
    # tensors and numpy scalars as values
    as_tensors = {m: {k: torch.tensor(v) for k, v in s.items()} for m, s in scores["dtd"].items()}
    as_numpy = {m: np.float32(a) for m, a in truth["dtd"].items()}
    mixed = evaluate_scores(as_tensors, as_numpy)
    assert mixed.tasks[0].scores["leep"].kendall_tau == pytest.approx(nested.task("dtd").scores["leep"].kendall_tau)


def test_a_ranking_is_accepted():
    f, y = make_features(120, 6, 3, seed=0)
    noise = np.random.default_rng(0).standard_normal((120, 6))
    ranking = rank_models({"good": f, "noise": noise, "mixed": f + 2 * noise}, y, scores=("logme", "h_score"))
    result = evaluate_scores(ranking, {"good": 0.9, "mixed": 0.7, "noise": 0.4})
    assert result.scores == ("logme", "h_score")
    assert result.tasks[0].scores["logme"].weighted_tau == 1.0 and result.tasks[0].scores["logme"].pick == "good"


def test_direction_from_the_registry_and_overrides(monkeypatch):
    truth = {"a": 1.0, "b": 2.0, "c": 3.0}
    rising = {"a": {"s": 1.0}, "b": {"s": 2.0}, "c": {"s": 3.0}}
    assert evaluate_scores(rising, truth).tasks[0].scores["s"].weighted_tau == 1.0
    flipped = evaluate_scores(rising, truth, larger_is_better={"s": False}).tasks[0].scores["s"]
    assert flipped.weighted_tau == -1.0 and flipped.pick == "a" and not flipped.top1
    # A registered smaller-is-better score is negated by default.
    spec = torch_logme.ScoreSpec(lambda x, y, **kw: torch.tensor(0.0), "features", False, "test", name="s")
    monkeypatch.setattr(ev, "SCORES", MappingProxyType({**torch_logme.SCORES, "s": spec}))
    result = evaluate_scores(rising, truth)
    assert result.larger_is_better == {"s": False} and result.tasks[0].scores["s"].weighted_tau == -1.0
    assert "smaller is better for s" in str(result)
    assert evaluate_scores(rising, truth, larger_is_better={"s": True}).tasks[0].scores["s"].weighted_tau == 1.0


def test_constant_scores_give_nan_and_null_json():
    result = evaluate_scores({"a": {"s": 1.0}, "b": {"s": 1.0}, "c": {"s": 1.0}}, {"a": 3, "b": 2, "c": 1})
    e = result.tasks[0].scores["s"]
    assert math.isnan(e.weighted_tau) and math.isnan(e.kendall_tau) and math.isnan(e.spearman)
    assert e.pick == "a" and e.top1  # all tied: the first listed, here the best
    d = json.loads(result.to_json())
    assert d["tasks"][0]["scores"]["s"]["weighted_tau"] is None and d["mean"]["s"]["top1"] == 1.0
    assert "nan" in str(result)


def test_to_dict_and_json():
    scores, truth = _split(TABLE)
    result = evaluate_scores(scores, truth)
    d = json.loads(result.to_json())
    assert d["scores"] == list(SCORE_NAMES) and d["metrics"] == list(ev.METRICS)
    assert d["larger_is_better"] == {"logme": True, "leep": True, "dist": True}
    assert [t["task"] for t in d["tasks"]] == list(TABLE)
    first = d["tasks"][0]
    assert first["models"] == list(TABLE["aircraft"]) and first["best"] == "densenet169"
    assert set(first["scores"]["logme"]) == {*ev.METRICS, "pick"}
    assert d["mean"]["logme"]["weighted_tau"] == pytest.approx(result.mean["logme"]["weighted_tau"])


def test_to_dataframe(monkeypatch):
    scores, truth = _split(TABLE)
    result = evaluate_scores(scores, truth)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="needs pandas"):
        result.to_dataframe()
    monkeypatch.undo()
    pd = pytest.importorskip("pandas")
    df = result.to_dataframe()
    assert list(df.columns) == ["task", "score", "models", *ev.METRICS, "pick"] and len(df) == 9
    means = df.groupby("score", sort=False)[list(ev.METRICS)].mean()
    for s in SCORE_NAMES:
        for m in ev.METRICS:
            assert means.loc[s, m] == pytest.approx(result.mean[s][m])
    # A DataFrame and a Series go in as well.
    frame = pd.DataFrame(scores["pets"]).T
    assert evaluate_scores(frame, pd.Series(truth["pets"])).tasks[0].scores == result.task("pets").scores


@pytest.mark.parametrize(
    "scores, truth, error, pattern",
    [
        ({"a": {"s": 1}, "b": {"s": 2}}, {"a": 1, "c": 2}, ValueError,
         r"no ground truth for \['b'\]; no scores for \['c'\]"),
        ({"a": {"s": 1}}, {"a": 1}, ValueError, "needs at least 2 models to compare orders, got 1"),
        ({"a": {"s": 1, "t": 2}, "b": {"s": 2}}, {"a": 1, "b": 2}, ValueError, r"model 'b' lacks \['t'\]"),
        ({"a": {"s": 1}, "b": {"s": 2, "t": 1}}, {"a": 1, "b": 2}, ValueError, r"model 'b' has extra \['t'\]"),
        ({"a": {"s": float("nan")}, "b": {"s": 2}}, {"a": 1, "b": 2}, ValueError, "model 'a', score 's' is NaN"),
        ({"a": {"s": 1}, "b": {"s": 2}}, {"a": 1, "b": float("nan")}, ValueError, "ground truth of model 'b' is NaN"),
        ({"a": {"s": "x"}, "b": {"s": 2}}, {"a": 1, "b": 2}, TypeError, "model 'a', score 's': expected a number"),
        ({"a": {"s": True}, "b": {"s": 2}}, {"a": 1, "b": 2}, TypeError, "expected a number"),
        ({"a": {}, "b": {}}, {"a": 1, "b": 2}, ValueError, "has no scores"),
        ([1, 2], {"a": 1, "b": 2}, TypeError, "must be a mapping"),
        ({"a": {"s": 1}, "b": {"s": 2}}, {}, ValueError, "ground_truth is empty"),
        ({"t": {"a": {"s": 1}}}, {"u": {"a": 1}}, ValueError,
         r"same tasks: no scores for \['u'\]; no ground truth for \['t'\]"),
        ({"t": {"a": {"s": 1}}}, {"t": {"a": 1}, "u": 2}, TypeError, "mixes numbers and mappings"),
        ({"t": {"a": {"s": 1}, "b": {"s": 2}}, "u": {"a": {"r": 1}, "b": {"r": 2}}},
         {"t": {"a": 1, "b": 2}, "u": {"a": 1, "b": 2}}, ValueError, "every task needs the same scores"),
        ({"t": {"a": {"s": 1}, "b": {"s": 2}}, "u": {"a": {"s": 1}}},
         {"t": {"a": 1, "b": 2}, "u": {"a": 1}}, ValueError, "task 'u': needs at least 2 models"),
    ],
)
def test_evaluate_scores_bad_inputs(scores, truth, error, pattern):
    with pytest.raises(error, match=pattern):
        evaluate_scores(scores, truth)


def test_bad_directions_and_pairs():
    scores, truth = {"a": {"s": 1}, "b": {"s": 2}}, {"a": 1, "b": 2}
    with pytest.raises(ValueError, match=r"larger_is_better names scores that are not given: \['x'\]"):
        evaluate_scores(scores, truth, larger_is_better={"x": True})
    with pytest.raises(TypeError, match="True or False"):
        evaluate_scores(scores, truth, larger_is_better={"s": "no"})
    with pytest.raises(TypeError, match="task -> \\(scores, ground truth\\)"):
        evaluate_scores({"t": scores})
    with pytest.raises(ValueError, match="scores_by_model is empty"):
        evaluate_scores({})


# -- the `evaluate` command -----------------------------------------------------------------


def _write_table(folder: Path, table=TABLE, tasks=True):
    lines = [("task," if tasks else "") + "model," + ",".join(SCORE_NAMES)]
    truth = [("task," if tasks else "") + "model,accuracy"]
    for t, rows in table.items():
        for m, (a, s) in rows.items():
            prefix = f"{t}," if tasks else ""
            lines.append(prefix + f"{m}," + ",".join(repr(s[k]) for k in SCORE_NAMES))
            truth.append(prefix + f"{m},{a!r}")
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    (folder / "truth.csv").write_text("\n".join(truth) + "\n")
    return folder / "scores.csv", folder / "truth.csv"


def test_cli_table_and_json(tmp_path, capsys):
    scores_csv, truth_csv = _write_table(tmp_path)
    assert main(["evaluate", str(scores_csv), str(truth_csv), "--smaller-is-better", "dist"]) == 0
    out = capsys.readouterr().out
    expected = evaluate_scores(*_split(TABLE), larger_is_better={"dist": False})
    assert out.strip() == str(expected)
    assert main(["evaluate", str(scores_csv), str(truth_csv), "--json", "--smaller-is-better", "dist"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["files"] == {"scores": str(scores_csv), "ground_truth": str(truth_csv)}
    del d["files"]
    assert d == json.loads(expected.to_json())


def test_cli_without_task_column(tmp_path, capsys):
    scores_csv, truth_csv = _write_table(tmp_path, {"one": TABLE["aircraft"]}, tasks=False)
    assert main(["evaluate", str(scores_csv), str(truth_csv)]) == 0
    out = capsys.readouterr().out
    scores, truth = _split({"one": TABLE["aircraft"]})
    assert out.strip() == str(evaluate_scores(scores["one"], truth["one"]))


def test_cli_reads_spreadsheet_csv(tmp_path, capsys):
    # A byte-order mark, spaces around cells, CRLF line ends, blank lines, another accuracy column name.
    (tmp_path / "s.csv").write_bytes("\ufeffModel , logme\r\n a , 1.5\r\n\r\nb,2e0\r\n c ,-1\r\n".encode("utf-8"))
    (tmp_path / "g.csv").write_text("model,top1\na,80\nb,90\nc,70\n")
    assert main(["evaluate", str(tmp_path / "s.csv"), str(tmp_path / "g.csv")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"logme\s+3\s+1\.0000\s+1\.0000\s+1\.0000\s+yes\s+b", out), out
    # With several value columns, the one named accuracy.
    (tmp_path / "g2.csv").write_text("model,std,Accuracy\na,1,70\nb,1,90\nc,1,80\n")
    assert main(["evaluate", str(tmp_path / "s.csv"), str(tmp_path / "g2.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["best"] == "b"


TRUTH2 = "model,accuracy\na,1\nb,2\n"


@pytest.mark.parametrize(
    "scores_text, truth_text, fragment",
    [
        (None, "model,accuracy\na,1\n", r"s\.csv: no such file"),
        ("", "model,accuracy\na,1\n", r"s\.csv: is empty"),
        ("name,logme\na,1\nb,2\n", TRUTH2, r"s\.csv: no 'model' column; the header is: name, logme"),
        ("model\na\nb\n", TRUTH2, r"s\.csv: no score columns"),
        ("model,logme\n", "model,accuracy\na,1\n", r"s\.csv: has a header but no rows"),
        ("model,logme,logme\na,1,1\n", "model,accuracy\na,1\n", r"s\.csv: the header names a column twice: logme"),
        ("model,,x\na,1,1\n", "model,accuracy\na,1\n", r"s\.csv: the header has an empty column name \(column 2\)"),
        ("model,logme\na,1\nb,x1\n", TRUTH2, r"s\.csv: line 3, column 'logme': 'x1' is not a number"),
        ("model,logme\na,1\nb,\n", TRUTH2, r"s\.csv: line 3, column 'logme': the cell is empty"),
        ("model,logme\na,nan\nb,1\n", TRUTH2, r"s\.csv: line 2, column 'logme': NaN"),
        ("model,logme\na,1\nb,1,3\n", TRUTH2, r"s\.csv: line 3 has 3 cells, but the header has 2"),
        ("model,logme\na,1\na,2\n", TRUTH2, r"s\.csv: model 'a' appears twice \(lines 2 and 3\)"),
        ("model,logme\na,1\n,2\n", TRUTH2, r"s\.csv: line 3: the 'model' cell is empty"),
        ("model,logme\na,1\nb,2\n", "model,accuracy\na,1\nc,2\n",
         r"the models differ between the files: in \S*s\.csv only: b; in \S*g\.csv only: c"),
        ("model,logme\na,1\nb,2\n", "model,acc,std\na,1,0\nb,2,0\n",
         r"g\.csv: expected one value column \(e\.g\. accuracy\) besides task and model, got: acc, std"),
        ("task,model,logme\nt,a,1\nt,b,2\n", TRUTH2,
         r"g\.csv: has no 'task' column, but \S*s\.csv has one"),
        ("task,model,logme\nt,a,1\nt,b,2\nu,a,1\nu,b,2\n", "task,model,accuracy\nt,a,1\nt,b,2\nv,a,1\nv,b,2\n",
         r"tasks differ between the files: in \S*s\.csv only: u; in \S*g\.csv only: v"),
        ("task,model,logme\nt,a,1\nt,b,2\nu,a,1\n", "task,model,accuracy\nt,a,1\nt,b,2\nu,a,1\n",
         r"task 'u': needs at least 2 models"),
        ("model,logme\na,1\nb,2\n", "model,accuracy\na,1\nb,ok\n",
         r"g\.csv: line 3, column 'accuracy': 'ok' is not a number"),
    ],
)
def test_cli_bad_files(tmp_path, capsys, scores_text, truth_text, fragment):
    if scores_text is not None:
        (tmp_path / "s.csv").write_text(scores_text)
    (tmp_path / "g.csv").write_text(truth_text)
    status = main(["evaluate", str(tmp_path / "s.csv"), str(tmp_path / "g.csv")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("torch-logme evaluate: error:") and re.search(fragment, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_direction_options(tmp_path, capsys):
    scores_csv, truth_csv = _write_table(tmp_path)
    assert main(["evaluate", str(scores_csv), str(truth_csv), "--smaller-is-better", "nope"]) == 1
    assert "larger_is_better names scores that are not given: ['nope']" in capsys.readouterr().err
    assert main(["evaluate", str(scores_csv), str(truth_csv), "--smaller-is-better", "dist",
                 "--larger-is-better", "dist"]) == 1
    assert "dist: given to both" in capsys.readouterr().err
    assert main(["evaluate", str(scores_csv), str(truth_csv), "--larger-is-better", "dist", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["larger_is_better"]["dist"] is True


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "only_one.csv"])
    assert exit_info.value.code == 2
    assert "GROUND_TRUTH.csv" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    # The real entry point, as a user sees it (the good path runs in-process above).
    _, truth_csv = _write_table(tmp_path)
    (tmp_path / "bad.csv").write_text("model,logme\na,one\n")
    proc = subprocess.run([sys.executable, "-m", "torch_logme", "evaluate", str(tmp_path / "bad.csv"), str(truth_csv)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "bad.csv: line 2, column 'logme'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_read_functions_return_nested_mappings(tmp_path):
    scores_csv, truth_csv = _write_table(tmp_path)
    tasked, scores = ev.read_scores_csv(scores_csv)
    assert tasked and list(scores) == list(TABLE) and scores["pets"]["googlenet"]["leep"] == -1.10
    tasked, truth = ev.read_ground_truth_csv(truth_csv)
    assert tasked and truth["dtd"]["resnet50"] == 75.0
    with pytest.raises(InputFileError):
        ev.read_scores_csv(tmp_path / "missing.csv")


def test_the_module_does_not_import_scipy_or_pandas_at_load():
    import ast

    tree = ast.parse(Path(ev.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"scipy", "pandas"}


def test_a_ranking_with_a_pooled_score_is_evaluated_on_its_scores_not_its_terms():
    import torch

    from torch_logme import rank_models

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    features = {f"m{i}": torch.randn(120, 6, generator=gen) + i * torch.nn.functional.one_hot(labels, 6)
                for i in range(4)}
    ranking = rank_models(features, labels, ["logme", "ncti"])
    assert any("." in name for name in ranking.entries[0].scores)  # the entries do hold the terms
    truth = {f"m{i}": float(i) for i in range(4)}
    evaluation = evaluate_scores(ranking, truth)
    assert sorted(evaluation.scores) == ["logme", "ncti"]
