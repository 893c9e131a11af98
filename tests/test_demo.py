"""Tests of the bundled digits data, the demo and the command line."""
import functools
import io
import math

import numpy as np
import pytest
import torch

from torch_logme import SCORES, demo
from torch_logme.__main__ import main

from conftest import DEVICES

CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
NAMES = [name for name, _ in demo.EXTRACTORS]
# Cheap extractors (64 or fewer features): every score runs in about a second on them.
CHEAP = ["pixels", "PCA, top 8 components", "4 random pixels"]


@pytest.fixture(scope="module")
def cpu_result():
    # One full run shared by the tests below: the demo costs tens of seconds.
    buf = io.StringIO()
    result = demo.run_demo(seed=0, device="cpu", compare_reference=False, file=buf)
    return result, buf.getvalue()


@pytest.fixture(scope="module")
def cheap_result():
    buf = io.StringIO()
    result = demo.run_demo(seed=1, device="cpu", compare_reference=False, file=buf, extractors=CHEAP)
    return result, buf.getvalue()


def test_load_digits():
    images, labels = demo.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0 and images.max() == 1
    # Stored as counts 0..16: scaling back must give integers.
    assert torch.equal(images * 16, (images * 16).round())
    assert torch.bincount(labels).tolist() == CLASS_COUNTS


def test_stratified_split():
    _, labels = demo.load_digits()
    train, test = demo.stratified_split(labels, 0.7, seed=3)
    both = torch.cat([train, test])
    assert both.unique().numel() == both.numel() == labels.numel()
    for c, count in enumerate(CLASS_COUNTS):
        assert abs(int((labels[train] == c).sum()) - 0.7 * count) <= 1
    again = demo.stratified_split(labels, 0.7, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])


def test_kendall_tau_known_values():
    assert demo.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert demo.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 6 concordant, 4 discordant pairs of 10.
    assert demo.kendall_tau([1, 2, 3, 4, 5], [3, 4, 1, 2, 5]) == pytest.approx(0.2)
    # Ties: tau-b = (5 - 0) / sqrt(5 * 6), the value scipy.stats.kendalltau gives.
    assert demo.kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    assert demo.kendall_tau(np.array([1.0, 2.0, 3.0, 4.0]), [2, 2, 1, 1]) == pytest.approx(-4 / math.sqrt(24))
    assert math.isnan(demo.kendall_tau([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError):
        demo.kendall_tau([1, 2, 3], [1, 2])


def test_source_probabilities():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    p = demo.source_probabilities(x, 20, seed=4)
    assert p.shape == (200, 20) and p.dtype == torch.float64
    assert torch.all(p >= 0) and torch.allclose(p.sum(1), torch.ones(200, dtype=torch.float64))
    assert torch.equal(p, demo.source_probabilities(x, 20, seed=4))  # seeded
    assert demo.source_probabilities(x).shape == (200, demo.SOURCE_CLASSES)
    # Few distinct rows: every row sits on its centre (variance 0) and the predictions are one-hot.
    rows = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]).repeat(10, 1)
    hard = demo.source_probabilities(rows, 3)
    assert torch.equal(hard.sum(1), torch.ones(30, dtype=torch.float64))
    assert set(hard.flatten().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.argmax(1)[:3].sort().values, torch.arange(3))  # one cluster per distinct row


def test_demo_tables(cpu_result):
    result, text = cpu_result
    assert sorted(r.name for r in result.rows) == sorted(NAMES)
    logme = [r.logme for r in result.rows]
    assert all(math.isfinite(s) for s in logme)
    assert logme == sorted(logme, reverse=True)
    for r in result.rows:
        assert 0.0 <= r.probe_accuracy <= 1.0
        assert r.torch_seconds >= 0 and r.dim >= 1
        assert r.reference_logme is None and r.reference_seconds is None
        assert r.name in text
    assert result.device == "cpu" and result.torch_version == torch.__version__
    assert result.train_size + result.test_size == 1797 and result.train_size == 1258
    assert "Kendall's tau" in text and torch.__version__ in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_every_score_with_its_taus(cpu_result):
    result, text = cpu_result
    for r in result.rows:
        assert list(r.scores) == list(SCORES) and list(r.score_seconds) == list(SCORES)
        assert all(math.isfinite(v) for v in r.scores.values()), r.scores
        assert r.errors == {} and r.logme == r.scores["logme"]
        assert r.torch_seconds == r.score_seconds["logme"]
        assert set(r.terms) == {f"{s}.{t}" for s, spec in SCORES.items() for t in spec.terms}
    assert list(result.weighted_taus) == list(SCORES) == list(result.kendall_taus)
    for s in SCORES:
        for tau in (result.weighted_taus[s], result.kendall_taus[s]):
            assert math.isfinite(tau) and -1.0 <= tau <= 1.0
        assert result.evaluations[s].weighted_tau == result.weighted_taus[s]
        assert s in text
    # The pooled scores are combined across the whole pool, as rank_models would.
    for s, spec in SCORES.items():
        if spec.pooled:
            terms = torch.tensor([[r.terms[f"{s}.{t}"] for t in spec.terms] for r in result.rows], dtype=torch.float64)
            assert spec.combine(terms).tolist() == [r.scores[s] for r in result.rows]
    best_first = result.scores_best_first()
    assert sorted(best_first) == sorted(SCORES)
    taus = [result.weighted_taus[s] for s in best_first]
    assert taus == sorted(taus, reverse=True)
    assert result.kendall_tau == result.kendall_taus["logme"]
    assert result.kendall_tau == pytest.approx(
        demo.kendall_tau([r.logme for r in result.rows], [r.probe_accuracy for r in result.rows]), abs=1e-12
    )
    assert result.weighted_tau == result.weighted_taus["logme"]


def test_logme_ranking_agrees_with_probe_accuracy(cpu_result):
    # The claim of the method on real data: LogME, computed without training on the
    # training split, orders the extractors as the probe does on held-out images.
    # Measured at seed 0: tau +0.94, weighted tau +0.87; most other scores agree too.
    result, _ = cpu_result
    assert result.kendall_tau > 0.5
    best, worst = result.rows[0], result.rows[-1]
    assert best.probe_accuracy > 0.95 and worst.probe_accuracy < 0.6
    assert np.median(list(result.weighted_taus.values())) > 0.5


def test_scores_read_the_training_split_only(monkeypatch):
    # Spy on what the scores and the source models are given, and poison the
    # held-out rows with NaN: a score that read one would fail on it (every
    # score rejects NaN), and its row would hold an error.
    images, labels = demo.load_digits()
    train_idx, test_idx = demo.stratified_split(labels, 0.7, seed=2)
    names = ["pixels", "PCA, top 8 components"]

    def poisoned(extractor):
        def run(x, gen):
            f = extractor(x, gen).clone()
            f[test_idx.to(f.device)] = math.nan
            return f
        return run

    extractors = [(name, poisoned(fn) if name in names else fn) for name, fn in demo.EXTRACTORS]
    monkeypatch.setattr(demo, "EXTRACTORS", extractors)
    scored = []
    real_rank_models = demo.rank_models

    def spy_rank_models(models, labels_given, scores, **kwargs):
        for name, model in models.items():
            if name in names:
                scored.append((name, scores, model["features"], model["probs"], labels_given))
        return real_rank_models(models, labels_given, scores, **kwargs)

    sources = []
    real_source = demo.source_probabilities

    def spy_source(features, *args, **kwargs):
        sources.append(features.shape[0])
        return real_source(features, *args, **kwargs)

    monkeypatch.setattr(demo, "rank_models", spy_rank_models)
    monkeypatch.setattr(demo, "source_probabilities", spy_source)
    result = demo.run_demo(seed=2, compare_reference=True, file=io.StringIO(), extractors=names)

    assert {(name, scores[0]) for name, scores, *_ in scored} == {(n, s) for n in names for s in SCORES}
    for _, _, features, probs, labels_given in scored:
        assert features.shape[0] == probs.shape[0] == len(train_idx)
        assert torch.isfinite(features).all()
        assert torch.equal(labels_given.cpu(), labels[train_idx])
    assert sources[-2:] == [len(train_idx)] * 2  # the warm-up's tiny source model comes first
    for r in result.rows:
        assert r.scored_rows == len(train_idx) and r.errors == {}
        assert all(math.isfinite(v) for v in r.scores.values())
        assert math.isfinite(r.reference_logme)
        # The probe did read the poisoned test rows: its predictions there are NaN's argmax.
        assert 0.0 <= r.probe_accuracy <= 1.0


def test_progress_is_printed_as_each_extractor_finishes(monkeypatch):
    # Each probe writes a marker into the report: every progress line must come
    # right after its extractor's probe, before the next extractor and the tables.
    buf = io.StringIO()
    real_probe = demo.linear_probe_accuracy

    def marked_probe(*args, **kwargs):
        acc = real_probe(*args, **kwargs)
        if len(args[2]) > 100:  # not the warm-up's tiny probe
            buf.write("PROBE\n")
        return acc

    monkeypatch.setattr(demo, "linear_probe_accuracy", marked_probe)
    demo.run_demo(seed=1, compare_reference=False, file=buf, extractors=CHEAP)
    lines = buf.getvalue().splitlines()
    marks = [i for i, line in enumerate(lines) if line == "PROBE"]
    progress = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert len(marks) == len(progress) == 3
    assert [lines[i].split("]")[0] for i in progress] == ["[1/3", "[2/3", "[3/3"]
    assert [m + 1 for m in marks] == progress
    table = lines.index(next(line for line in lines if line.startswith("rank  extractor")))
    assert progress[-1] < table
    for i, name in zip(progress, ["pixels", "PCA, top 8 components", "4 random pixels"]):  # EXTRACTORS order
        assert name in lines[i] and "13 scores" in lines[i]


def test_demo_is_deterministic(cheap_result):
    result, text = cheap_result
    again = demo.run_demo(seed=1, compare_reference=False, file=io.StringIO(), extractors=CHEAP)
    for r, s in zip(result.rows, again.rows):
        assert (r.name, r.scores, r.terms, r.probe_accuracy) == (s.name, s.scores, s.terms, s.probe_accuracy)
    assert result.weighted_taus == again.weighted_taus and result.kendall_taus == again.kendall_taus
    other = demo.run_demo(seed=2, compare_reference=False, file=io.StringIO(), extractors=["pixels"])
    assert other.rows[0].scores["logme"] != next(r for r in result.rows if r.name == "pixels").scores["logme"]


def test_one_extractor_has_no_taus():
    buf = io.StringIO()
    result = demo.run_demo(compare_reference=False, file=buf, extractors=["4 random pixels"])
    assert len(result.rows) == 1 and math.isnan(result.kendall_tau)
    assert all(math.isnan(v) for v in result.weighted_taus.values())
    assert all(math.isfinite(v) for v in result.rows[0].scores.values())
    assert "n/a" in buf.getvalue()


def test_demo_matches_reference():
    # The cheap extractors only: numba compiles once per process anyway.
    buf = io.StringIO()
    result = demo.run_demo(seed=1, compare_reference=True, file=buf, extractors=CHEAP)
    assert len(result.rows) == 3
    for r in result.rows:
        assert r.reference_logme == pytest.approx(r.logme, rel=1e-9, abs=1e-9)
        assert r.reference_seconds >= 0
    assert "|torch-ref|" in buf.getvalue()


def test_run_demo_rejects_unknown_extractor():
    with pytest.raises(ValueError, match="unknown extractors"):
        demo.run_demo(extractors=["no such thing"], file=io.StringIO())


@pytest.mark.parametrize("accel", [d for d in DEVICES if d != "cpu"])
def test_demo_accelerator_matches_cpu(cheap_result, accel):
    result, _ = cheap_result
    other = demo.run_demo(seed=1, device=accel, compare_reference=False, file=io.StringIO(), extractors=CHEAP)
    cpu = {r.name: r for r in result.rows}
    for r in other.rows:
        c = cpu[r.name]
        assert r.probe_accuracy == pytest.approx(c.probe_accuracy, abs=0.01)
        assert r.logme == pytest.approx(c.logme, rel=1e-6, abs=1e-6)
        # Closed forms agree to round-off; iterative ones (k-means, EM) may settle elsewhere.
        for s in ("h_score", "regularized_h_score", "transrate", "gbc", "sfda"):
            assert r.scores[s] == pytest.approx(c.scores[s], rel=1e-6, abs=1e-9), s
        assert all(math.isfinite(v) for v in r.scores.values())
    assert all(-1.0 <= t <= 1.0 for t in other.weighted_taus.values())


def test_main_demo(capsys, monkeypatch, cheap_result):
    # The command runs every extractor; a subset keeps this test short.
    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, extractors=CHEAP))
    assert main(["demo", "--no-reference", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for name in CHEAP:
        assert name in out
    for s in SCORES:
        assert s in out
    assert "Kendall's tau" in out and "weighted tau" in out
    # Same seed and extractors as the fixture: the printed scores are reproduced exactly.
    result, text = cheap_result
    for r in result.rows:
        assert f"{r.logme:.4f}" in out
    # The agreement table holds no timing: it is reproduced whole.
    def agreement(report):
        return report[report.index("agreement of each score"):report.index("Kendall's tau between")]

    assert agreement(out) == agreement(text)


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
