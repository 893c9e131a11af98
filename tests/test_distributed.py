"""Two CPU processes (gloo, loopback): each scores half the batches, then they sync."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from torch_logme import LogMEAccumulator, logme

from conftest import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD = 2


def _data():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(240, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (240,), generator=gen)
    f[:, :2] += y.unsqueeze(1).double()
    return f, y


def _scenario(rank: int, out_dir: str, scenario: str) -> None:
    """Score this rank's part of ``scenario`` and save what the test checks."""
    f, y = _data()
    result = {}
    if scenario == "halves":
        acc = LogMEAccumulator(12)  # classes grow per rank: rank 1 never sees class 4
        for i, start in enumerate(range(0, 240, 20)):
            if i % WORLD == rank:
                rows = slice(start, start + 20)
                yb = y[rows] if rank == 0 else y[rows].clamp_max(3)
                acc.update(f[rows], yb)
        result["compute"] = acc.compute(reduction="none")  # syncs a copy
        result["again"] = acc.compute(reduction="none")  # no double counting
        acc.sync()
        acc.sync_on_compute = False  # no further sync: the local state is the global one now
        result["synced_local"] = acc.compute(reduction="none")
    elif scenario == "mismatch":
        acc = LogMEAccumulator(12 if rank == 0 else 11)
        acc.update(f[:10, : acc.num_features], y[:10])
        try:
            acc.compute()
            result["error"] = None
        except ValueError as err:
            result["error"] = str(err)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, scenario):
    run_ranks(_scenario, (str(tmp_path), scenario), WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_equal_one_process(tmp_path):
    results = _run(tmp_path, "halves")
    f, y = _data()
    # What the two ranks saw together, as one data set.
    seen_y = torch.cat([
        y[s:s + 20] if (s // 20) % WORLD == 0 else y[s:s + 20].clamp_max(3) for s in range(0, 240, 20)
    ])
    expected = logme(f, seen_y, reduction="none")
    for res in results:
        for key in ("compute", "again", "synced_local"):
            assert torch.allclose(res[key], expected, rtol=1e-10, atol=0), key


def test_ranks_disagreeing_on_num_features_is_an_error(tmp_path):
    results = _run(tmp_path, "mismatch")
    for res in results:
        assert res["error"] is not None and "disagree on num_features" in res["error"]
