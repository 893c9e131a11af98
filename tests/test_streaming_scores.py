"""Streaming accumulators of the other scores equal the functional scores on the concatenated data."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from torch_logme import (
    GBCAccumulator,
    HScoreAccumulator,
    NCEAccumulator,
    RegularizedHScoreAccumulator,
    TransRateAccumulator,
    gbc,
    h_score,
    nce,
    regularized_h_score,
    transrate,
)

from conftest import batches, make_features, run_ranks

RTOL = 1e-10

ACCUMULATORS = {
    "h_score": (HScoreAccumulator, h_score),
    "regularized_h_score": (RegularizedHScoreAccumulator, regularized_h_score),
    "transrate": (TransRateAccumulator, transrate),
    "gbc": (GBCAccumulator, gbc),
}


def close(a, b, rtol=RTOL):
    return abs(float(a) - float(b)) <= rtol * abs(float(b)) + 1e-13


@pytest.mark.parametrize("shape", [(300, 16), (30, 50), (400, 260)], ids=["N>D", "N<D", "D>=256"])
@pytest.mark.parametrize("score", ACCUMULATORS.keys())
def test_equals_functional(device, score, shape):
    cls, fn = ACCUMULATORS[score]
    n, d = shape
    f, y = make_features(n, d, 5, seed=n + d)
    ft, yt = torch.from_numpy(f).float().to(device), torch.from_numpy(y).to(device)
    acc = cls(d)
    for rows in batches(n, [1, 7, 32]):
        acc.update(ft[rows], yt[rows])
    out = acc.compute()
    assert out.device.type == device and out.dtype == torch.float64
    assert close(out, fn(ft, yt))  # N < D: the functional H-scores take the dual route


@pytest.mark.parametrize("score", ACCUMULATORS.keys())
def test_merge_state_dict_reset(score):
    cls, fn = ACCUMULATORS[score]
    f, y = make_features(200, 8, 4, seed=1)
    y = np.where(y == 3, 5, y)  # an empty id in the middle
    ft, yt = torch.from_numpy(f), torch.from_numpy(y)
    first, second = cls(8), cls(8)
    first.update(ft[:90], yt[:90].clamp_max(4))  # this one sees fewer classes
    second.update(ft[90:], yt[90:])
    # merge grows the smaller class dimension
    merged = cls(8)
    merged.merge(first)
    merged.merge(second)
    full = torch.cat([yt[:90].clamp_max(4), yt[90:]])
    assert close(merged.compute(), fn(ft, full))
    buf = io.BytesIO()
    torch.save(merged.state_dict(), buf)
    restored = cls(8)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert close(restored.compute(), merged.compute(), rtol=0)
    restored.reset()
    with pytest.raises(ValueError, match="at least 2 samples"):
        restored.compute()


ALL_ACCUMULATORS = {name: cls for name, (cls, _) in ACCUMULATORS.items()}
ALL_ACCUMULATORS["nce"] = NCEAccumulator


def _fill(name, cls, device, n=80, d=6):
    f, y = make_features(n, d, 3, seed=3)
    yt = torch.from_numpy(y).to(device)
    if name == "nce":
        acc = cls()
        acc.update((yt + 1) % 3, yt)
    else:
        acc = cls(d)
        acc.update(torch.from_numpy(f).to(device), yt)
    return acc, (lambda **kw: cls(**kw)) if name == "nce" else (lambda **kw: cls(d, **kw))


@pytest.mark.parametrize("score", ALL_ACCUMULATORS.keys())
def test_load_state_dict_device(device, score):
    """A fresh accumulator makes its sums on the saved tensors' device unless given device=."""
    saved, fresh = _fill(score, ALL_ACCUMULATORS[score], device)
    state = saved.state_dict()
    where = {v.device for v in saved.states.values()}
    restored = fresh()
    restored.load_state_dict(state)
    assert {v.device for v in restored.states.values()} == where
    for name, value in restored.states.items():
        assert torch.equal(value, state[name]), name
    assert close(restored.compute(), saved.compute(), rtol=0)  # same sums, same device, same code
    on_cpu = fresh(device="cpu")
    on_cpu.load_state_dict(state)
    assert {v.device.type for v in on_cpu.states.values()} == {"cpu"}
    merged = fresh()
    merged.merge(saved)
    assert {v.device for v in merged.states.values()} == where
    # The same rule on "meta" (shapes only): runs on every machine.
    meta = fresh()
    meta.load_state_dict({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    assert {v.device.type for v in meta.states.values()} == {"meta"}


@pytest.mark.parametrize("score", ACCUMULATORS.keys())
def test_fixed_classes_and_checks(score):
    cls, fn = ACCUMULATORS[score]
    f, y = make_features(120, 6, 3, seed=2)
    acc = cls(6, 4, check_inputs=False)  # sync-free updates: no value checks
    acc.update(f[:60], y[:60])
    acc.update(f[60:], y[60:])
    assert acc.num_classes == 4
    assert close(acc.compute(), fn(f, y))
    with pytest.raises(ValueError, match="out of range"):
        cls(6, 2).update(f, y)
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        cls(6).update(f[:, :5], y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cls(6).update(np.full((3, 6), np.nan), y[:3])
    with pytest.raises(ValueError, match="num_features"):
        cls(0)
    with pytest.raises(ValueError, match="cannot merge"):
        cls(6, 4).merge(cls(6))
    with pytest.raises(ValueError, match="all zero"):
        zero = cls(6)
        zero.update(np.zeros((5, 6)), y[:5])
        zero.compute()


@pytest.mark.parametrize("score", ACCUMULATORS.keys())
def test_first_update_under_inference_mode(score):
    cls, fn = ACCUMULATORS[score]
    f, y = make_features(80, 5, 3, seed=6)
    ft, yt = torch.from_numpy(f), torch.from_numpy(y)
    acc = cls(5)
    with torch.inference_mode():  # as Lightning validates
        acc.update(ft[:40], yt[:40])
    acc.update(ft[40:], yt[40:])
    assert close(acc.compute(), fn(ft, yt))
    acc.reset()
    with pytest.raises(ValueError, match="NaN or Inf"):  # a bad first batch allocates nothing
        fresh = cls(5, device="cpu")
        fresh.update(np.full((3, 5), np.nan), y[:3])


def test_accumulator_options():
    f, y = make_features(150, 6, 3, seed=3)
    acc = TransRateAccumulator(6, eps=1e-2)
    acc.update(f, y)
    assert close(acc.compute(), transrate(f, y, eps=1e-2))
    acc = GBCAccumulator(6, min_variance=0.3, dtype=torch.float32)
    acc.update(f, y)
    out = acc.compute()
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(gbc(f, y, min_variance=0.3)), rel=1e-4)
    with pytest.raises(ValueError, match="eps"):
        TransRateAccumulator(6, eps=0)
    with pytest.raises(ValueError, match="dtype"):
        HScoreAccumulator(6, dtype=torch.int32)


def test_nce_accumulator(device):
    rng = np.random.default_rng(4)
    s, t = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
    st, tt = torch.from_numpy(s).to(device), torch.from_numpy(t).to(device)
    acc = NCEAccumulator()
    for rows in batches(300, [1, 13, 64]):
        acc.update(st[rows], tt[rows])
    out = acc.compute()
    assert out.device.type == device
    assert close(out, nce(st, tt))
    other = NCEAccumulator()
    other.update(st[:10].clamp_max(2), tt[:10])
    acc.merge(other)
    assert close(acc.compute(), nce(torch.cat([st, st[:10].clamp_max(2)]), torch.cat([tt, tt[:10]])))
    fixed = NCEAccumulator(6, 4, check_inputs=False)
    fixed.update(s, t)
    assert close(fixed.compute(), nce(s, t))
    with pytest.raises(ValueError, match="out of range"):
        NCEAccumulator(3, 4).update(s, t)
    with pytest.raises(ValueError, match="disagree on N"):
        NCEAccumulator().update(s, t[:-1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        NCEAccumulator().compute()


# -- two CPU processes (gloo): each rank sees half the batches, compute() sums them --------

def _rank_data(scenario: str):
    """Features [240, 6], labels and hard source labels of the two-rank tests.

    "offset": features of spread 1e100 about per-column offsets near 3e107,
    the odd batches (rank 1's) 5e108 further: the ranks' first batches give
    them different shifts and power-of-two scales, which sync must reconcile.
    """
    f, y = make_features(240, 6, 5, seed=5)
    if scenario == "offset":
        f = f * 1e100 + np.linspace(1.0, 3.0, 6) * 3e107
        f[np.arange(240) // 20 % 2 == 1] += 5e108
    return f, y, (y * 3 + np.arange(240)) % 7


def _rank_scores(rank: int, out_dir: str, scenario: str) -> None:
    """Score this rank's batches with every accumulator and save the results."""
    f, y, src = _rank_data(scenario)
    accs = {name: cls(6) for name, (cls, _) in ACCUMULATORS.items()}
    accs["nce"] = NCEAccumulator()
    for i, rows in enumerate(batches(240, [20])):
        if i % 2 != rank:
            continue
        yb = y[rows] if rank == 0 else np.minimum(y[rows], 3)  # rank 1 never sees class 4
        for name, acc in accs.items():
            acc.update(src[rows], yb) if name == "nce" else acc.update(f[rows], yb)
    result = {name: acc.compute() for name, acc in accs.items()}  # syncs a copy
    for name, acc in accs.items():  # sync() in place, then compute the local (now global) sums
        acc.sync()
        acc.sync_on_compute = False
        result[f"{name} synced"] = acc.compute()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("scenario", ["plain", "offset"])
def test_two_ranks_equal_one_process(tmp_path, scenario):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    run_ranks(_rank_scores, (str(tmp_path), scenario))
    f, y, src = _rank_data(scenario)
    seen = np.concatenate([y[r] if i % 2 == 0 else np.minimum(y[r], 3) for i, r in enumerate(batches(240, [20]))])
    expected = {name: fn(f, seen) for name, (_, fn) in ACCUMULATORS.items()}
    expected["nce"] = nce(src, seen)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            assert close(got[name], value), (rank, name, float(got[name]), float(value))
            assert close(got[f"{name} synced"], value), (rank, name, "synced")
