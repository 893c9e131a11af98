"""The collecting accumulator and metric (scores that cannot stream) under faults: ranks agree or all raise."""
from __future__ import annotations

import os

import pytest
import torch

from torch_logme import SCORES, accumulator

from conftest import run_ranks

NAME = "knn"  # a score that cannot stream, on features


def _data(seed: int = 0, n: int = 60, d: int = 5):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) + y[:, None], y


def test_merge_and_load_check_the_width_set_up_front():
    x, y = _data()
    acc = accumulator(NAME, 5, collect=True)
    other = accumulator(NAME, None, collect=True)
    other.update(torch.randn(4, 7, dtype=torch.float64), y[:4])
    with pytest.raises(ValueError, match="widths"):
        acc.merge(other)
    free = accumulator(NAME, None, collect=True)
    free.update(x, y)
    wide = accumulator(NAME, None, collect=True)
    wide.update(torch.randn(8, 7, dtype=torch.float64), y[:8])
    free.load_state_dict(wide.state_dict())  # the loaded rows replace those of another width
    assert free.state_dict()["rows"].shape == (8, 7)
    with pytest.raises(RuntimeError, match="process group"):
        free.sync()


def _metric_body(rank: int, out_dir: str) -> None:
    from torch_logme.integrations.torchmetrics import TransferabilityMetric

    x, y = _data()
    metric = TransferabilityMetric(NAME, 5)
    if rank == 0:  # rank 1 sees no batch
        metric.update(x, y)
    torch.save(metric.compute(), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_collected_metric_with_a_rank_without_batches(tmp_path):
    pytest.importorskip("torchmetrics")
    run_ranks(_metric_body, (str(tmp_path),), timeout=120, timeout_s=60)
    x, y = _data()
    want = SCORES[NAME].fn(x, y)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want)


def _synced_body(rank: int, out_dir: str) -> None:
    x, y = _data(seed=rank)
    acc = accumulator(NAME, 5, collect=True)
    acc.update(x, y)
    acc.sync()
    acc.sync()  # nothing new: the same rows
    first = acc.compute()
    if rank == 0:
        acc.update(x[:5], y[:5])  # new rows on one rank only
    try:
        acc.compute()
        message = "no error"
    except ValueError as err:
        message = str(err)
    torch.save((first, message), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_synced_and_unsynced_ranks_raise_together(tmp_path):
    run_ranks(_synced_body, (str(tmp_path),), timeout=120, timeout_s=60)
    x0, y0 = _data(seed=0)
    x1, y1 = _data(seed=1)
    want = SCORES[NAME].fn(torch.cat([x0, x1]), torch.cat([y0, y1]))
    for rank in range(2):
        first, message = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(first, want)
        assert "some ranks have synced" in message


def test_rows_that_are_not_probabilities_are_refused_at_update():
    acc = accumulator("leep", None, collect=True)
    y = torch.tensor([0, 1, 1])
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    acc.update(probs, y)
    with pytest.raises(ValueError, match="must sum to 1"):
        acc.update(torch.tensor([[0.7, 0.7], [0.3, 0.3]]), y[:2])
    with pytest.raises(ValueError, match="negative"):
        acc.update(torch.tensor([[1.5, -0.5]]), y[:1])
    assert torch.equal(acc.compute(), SCORES["leep"].fn(probs, y))  # the refused batches left nothing
