"""Tests of the bundled digits data, the demo and the command line."""
import io
import math

import numpy as np
import pytest
import torch

from torch_logme import demo
from torch_logme.__main__ import main

from conftest import DEVICES

CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
NAMES = [name for name, _ in demo.EXTRACTORS]


@pytest.fixture(scope="module")
def cpu_result():
    # One run shared by the tests below: the demo costs a few seconds.
    buf = io.StringIO()
    result = demo.run_demo(seed=0, device="cpu", compare_reference=False, file=buf)
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


def test_demo_table(cpu_result):
    result, text = cpu_result
    assert sorted(r.name for r in result.rows) == sorted(NAMES)
    scores = [r.logme for r in result.rows]
    assert all(math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)
    for r in result.rows:
        assert 0.0 <= r.probe_accuracy <= 1.0
        assert r.torch_seconds >= 0 and r.dim >= 1
        assert r.reference_logme is None and r.reference_seconds is None
    assert result.device == "cpu" and result.torch_version == torch.__version__
    for r in result.rows:
        assert r.name in text
    assert "Kendall's tau" in text and torch.__version__ in text


def test_logme_ranking_agrees_with_probe_accuracy(cpu_result):
    # The claim of the method on real data: LogME, computed without training,
    # orders the extractors as the trained probe does. Measured tau is +0.89.
    result, _ = cpu_result
    assert result.kendall_tau > 0.5
    best, worst = result.rows[0], result.rows[-1]
    assert best.probe_accuracy > 0.95 and worst.probe_accuracy < 0.6


def test_demo_matches_reference():
    # The cheap extractors only: numba compiles once per process anyway.
    names = ["pixels", "PCA, top 8 components", "4 random pixels"]
    buf = io.StringIO()
    result = demo.run_demo(seed=1, compare_reference=True, file=buf, extractors=names)
    assert len(result.rows) == 3
    for r in result.rows:
        assert r.reference_logme == pytest.approx(r.logme, rel=1e-9, abs=1e-9)
        assert r.reference_seconds >= 0
    assert "|torch-ref|" in buf.getvalue()


def test_run_demo_rejects_unknown_extractor():
    with pytest.raises(ValueError, match="unknown extractors"):
        demo.run_demo(extractors=["no such thing"], file=io.StringIO())


@pytest.mark.parametrize("accel", [d for d in DEVICES if d != "cpu"])
def test_demo_accelerator_matches_cpu(cpu_result, accel):
    result, _ = cpu_result
    cuda = demo.run_demo(device=accel, compare_reference=False, file=io.StringIO())
    cpu_scores = {r.name: r.logme for r in result.rows}
    for r in cuda.rows:
        assert r.logme == pytest.approx(cpu_scores[r.name], rel=1e-6, abs=1e-6)
    assert cuda.kendall_tau > 0.5


def test_main_demo(capsys, cpu_result):
    assert main(["demo", "--no-reference"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "Kendall's tau" in out
    # Same seed as the fixture: the printed scores are reproduced exactly.
    result, _ = cpu_result
    for r in result.rows:
        assert f"{r.logme:.4f}" in out


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
