"""LogMEAccumulator: streaming equals logme on the concatenated data."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from torch_logme import LogMEAccumulator, logme

from conftest import DTYPES, batches, make_features

RTOL = 1e-10


def close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return torch.allclose(a, b, rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", [(400, 30), (40, 60), (50, 50)], ids=["N>D", "N<D", "N=D"])
@pytest.mark.parametrize("in_dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["fixed_point", "icml"])
def test_classification_equals_logme(device, shape, in_dtype, method):
    n, d = shape
    f, y = make_features(n, d, 5, seed=n + d)
    ft = torch.from_numpy(f).to(in_dtype).to(device)
    yt = torch.from_numpy(y).to(device)
    acc = LogMEAccumulator(d, 5, method=method)
    for rows in batches(n, [1, 7, 32]):  # batch sizes 1, 7 and 32
        acc.update(ft[rows], yt[rows])
    assert close(acc.compute(), logme(ft, yt, num_classes=5, method=method))
    assert close(acc.compute(reduction="none"), logme(ft, yt, num_classes=5, method=method, reduction="none"))
    assert acc.compute().device.type == device


@pytest.mark.parametrize("shape", [(300, 20), (30, 40)], ids=["N>D", "N<D"])
def test_regression_equals_logme(device, shape):
    n, d = shape
    rng = np.random.default_rng(1)
    f = torch.from_numpy(rng.standard_normal((n, d))).to(device)
    y = f[:, :3] @ torch.ones(3, 2, dtype=f.dtype, device=device) + torch.from_numpy(
        rng.standard_normal((n, 2))).to(device)
    acc = LogMEAccumulator(d, regression=True)
    for rows in batches(n, [16]):
        acc.update(f[rows], y[rows])
    assert close(acc.compute(), logme(f, y, regression=True))
    one = LogMEAccumulator(d, regression=True, num_targets=1)
    for rows in batches(n, [16]):
        one.update(f[rows], y[rows, 0])
    assert close(one.compute(), logme(f, y[:, 0], regression=True))


def test_legacy_evidence_matches_logme(device):
    f, y = make_features(30, 50, 3, seed=3)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    acc = LogMEAccumulator(50, 3, legacy_evidence=True)
    acc.update(ft, yt)
    assert close(acc.compute(), logme(ft, yt, legacy_evidence=True))


def test_classes_grow_on_update(device):
    f, y = make_features(200, 10, 6, seed=4)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    order = torch.argsort(yt, stable=True)  # classes arrive in increasing order
    acc = LogMEAccumulator(10)
    for rows in batches(200, [25]):
        acc.update(ft[order][rows], yt[order][rows])
    assert acc.num_columns == 6
    assert close(acc.compute(reduction="none"), logme(ft, yt, reduction="none"))


def test_fixed_num_classes_rejects_larger_labels():
    acc = LogMEAccumulator(4, 3)
    with pytest.raises(ValueError, match="out of range for num_classes=3"):
        acc.update(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]))


def test_unchecked_updates_take_no_host_read(monkeypatch):
    acc = LogMEAccumulator(4, 3, check_inputs=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("value check ran")

    monkeypatch.setattr("torch_logme._checks._check_values", forbidden)
    acc.update(torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 0]))
    acc.update(torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 1]))
    assert torch.isfinite(acc.compute())


def test_reset_merge_and_memory(device):
    f, y = make_features(120, 8, 3, seed=5)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    a, b = LogMEAccumulator(8), LogMEAccumulator(8)
    a.update(ft[:50], yt[:50])
    b.update(ft[50:], yt[50:] % 2)  # b sees fewer classes: merge pads it
    merged = a.merge(b)
    assert merged is a
    y_all = torch.cat([yt[:50], yt[50:] % 2])
    assert close(a.compute(), logme(ft, y_all, num_classes=3))
    # O(D^2 + D C) numbers, whatever N.
    assert sum(v.numel() for v in a.states.values()) == 8 * 8 + 8 + 3 * 8 + 3 + 3 + 1
    a.reset()
    a.update(ft[:60], yt[:60])
    assert close(a.compute(), logme(ft[:60], yt[:60], num_classes=3))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(LogMEAccumulator(9))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(LogMEAccumulator(8, regression=True))


# Two accumulators with the same sums, fed the same batch on the same device:
# on the CPU every operation runs in a fixed order, so the scores are equal
# bit for bit. On CUDA the class sums use index_add_, whose atomic adds run
# in any order, so the sums may differ in their last bit; the scores of these
# well-conditioned problems then agree to far better than 1e-12.
SAME_DEVICE_RTOL = {"cpu": 0.0, "cuda": 1e-12}


def test_state_dict_round_trip(device):
    f, y = make_features(100, 6, 4, seed=6)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    a = LogMEAccumulator(6)
    a.update(ft[:70], yt[:70])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LogMEAccumulator(6)
    b.load_state_dict(torch.load(buf))
    # b had no sums yet: it makes them where the saved ones were, so a and b
    # run on the same device and can be compared closely.
    assert {v.device for v in b.states.values()} == {ft.device}
    a.update(ft[70:], yt[70:])
    b.update(ft[70:], yt[70:])
    assert close(a.compute(), b.compute(), rtol=SAME_DEVICE_RTOL[device])
    assert close(b.compute(), logme(ft, yt))
    with pytest.raises(ValueError, match="do not match"):
        LogMEAccumulator(7).load_state_dict(a.state_dict())


def test_load_state_dict_device(device):
    f, y = make_features(60, 5, 3, seed=7)
    ft, yt = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    saved = LogMEAccumulator(5)
    saved.update(ft, yt)
    state = saved.state_dict()
    # No device given: the saved tensors' device, whichever it is.
    restored = LogMEAccumulator(5)
    restored.load_state_dict(state)
    assert {v.device for v in restored.states.values()} == {ft.device}
    for name, value in restored.states.items():
        assert torch.equal(value, state[name]), name
    # device= given: it wins.
    on_cpu = LogMEAccumulator(5, device="cpu")
    on_cpu.load_state_dict(state)
    assert {v.device.type for v in on_cpu.states.values()} == {"cpu"}
    # Sums already made: they stay where they are.
    existing = LogMEAccumulator(5)
    existing.update(ft.cpu()[:10], yt.cpu()[:10])
    existing.load_state_dict(state)
    assert {v.device.type for v in existing.states.values()} == {"cpu"}
    assert close(existing.compute(), saved.compute())
    # merge into an accumulator with no sums follows the same rule.
    merged = LogMEAccumulator(5)
    merged.merge(saved)
    assert {v.device for v in merged.states.values()} == {ft.device}


def test_load_state_dict_follows_any_device():
    """The rule on a device every machine has: tensors on "meta" (shapes only, no data)."""
    f, y = make_features(40, 4, 3, seed=8)
    acc = LogMEAccumulator(4)
    acc.update(torch.from_numpy(f), torch.from_numpy(y))
    state = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in acc.state_dict().items()}
    restored = LogMEAccumulator(4)  # classes grow: its class dimension is resized to the saved one
    restored.load_state_dict(state)
    assert {v.device.type for v in restored.states.values()} == {"meta"}
    assert restored.num_columns == 3


# State dicts saved by LogMEAccumulator before the accumulators shared one
# allocation machinery (commit 50de705), written out as literals: a checkpoint
# of that layout must keep loading, and score as it did then.
_F1 = [[10.0, 1.0, -2.0], [12.0, 0.0, -1.0], [11.0, 3.0, -2.0], [9.0, 2.0, -3.0]]
_F2 = [[10.5, 2.0, -2.5], [11.5, 1.0, -1.5], [13.0, -1.0, -0.5]]
_GRAM = [[12.25, -8.75, 7.25], [-8.75, 11.75, -6.25], [7.25, -6.25, 4.75]]


def _saved_state(dtype, cross, target_sum, target_sq, config):
    def t(values, kind=dtype):
        return torch.tensor(values, dtype=kind)

    return {
        "gram": t(_GRAM), "feature_sum": t([3.5, -2.5, 1.5]), "cross": t(cross), "target_sum": t(target_sum),
        "target_sq": t(target_sq), "num_samples": t(7.0, torch.float64), "shift": t([10.5, 1.5, -2.0]),
        "config": config, "sizes": {"num_features": 3, "num_columns": len(target_sum)},
    }


def test_loads_state_dict_of_earlier_layout():
    # Classification, classes grown on update: _F1 with labels [0, 1, 1, 0], then _F2 with [2, 1, 2].
    state = _saved_state(
        torch.float64, [[-2.0, 0.0, -1.0], [3.0, -0.5, 1.5], [2.5, -2.0, 1.0]], [2.0, 3.0, 2.0], [2.0, 3.0, 2.0],
        {"num_features": 3, "regression": False, "fixed_columns": None, "dtype": "torch.float64"},
    )
    acc = LogMEAccumulator(3)
    acc.load_state_dict(state)
    assert acc.num_columns == 3 and torch.equal(acc.shift, state["shift"])
    for name, value in acc.states.items():
        assert torch.equal(value, state[name]) and value.dtype == state[name].dtype, name
    assert close(acc.compute(), torch.tensor(-0.8071896780043536, dtype=torch.float64), rtol=1e-12)
    expected = torch.tensor([-0.7832969011813776, -0.8844076012220906, -0.7538645316095922], dtype=torch.float64)
    assert close(acc.compute(reduction="none"), expected, rtol=1e-12)
    features = torch.tensor(_F1 + _F2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 2, 1, 2])
    assert close(acc.compute(), logme(features, labels))
    resaved = acc.state_dict()  # the same keys, sizes and settings as the earlier layout
    assert set(resaved) == set(state) and resaved["sizes"] == state["sizes"] and resaved["config"] == state["config"]
    acc.update(features, labels)  # and it keeps accumulating
    assert close(acc.compute(), logme(torch.cat([features, features]), torch.cat([labels, labels])))

    # Regression in float32 (its count float64 even so), targets [B, 2] fixed up front.
    state = _saved_state(
        torch.float32, [[0.5, -2.0, -0.75], [-4.125, 2.875, -3.25]], [7.0, 3.25], [17.5, 6.5625],
        {"num_features": 3, "regression": True, "fixed_columns": 2, "dtype": "torch.float32"},
    )
    reg = LogMEAccumulator(3, regression=True, num_targets=2, dtype=torch.float32)
    reg.load_state_dict(state)
    assert reg.states["num_samples"].dtype == torch.float64 and reg.states["gram"].dtype == torch.float32
    assert close(reg.compute(), torch.tensor(-1.646598219871521, dtype=torch.float64), rtol=1e-6)

    # Saved before any batch: no shift, and the first batch after loading sets one.
    empty = {
        "gram": torch.zeros(3, 3, dtype=torch.float64), "feature_sum": torch.zeros(3, dtype=torch.float64),
        "cross": torch.zeros(3, 3, dtype=torch.float64), "target_sum": torch.zeros(3, dtype=torch.float64),
        "target_sq": torch.zeros(3, dtype=torch.float64), "num_samples": torch.tensor(0.0, dtype=torch.float64),
        "shift": None, "config": {"num_features": 3, "regression": False, "fixed_columns": 3, "dtype": "torch.float64"},
        "sizes": {"num_features": 3, "num_columns": 3},
    }
    fresh = LogMEAccumulator(3, num_classes=3)
    fresh.load_state_dict(empty)
    assert fresh.shift is None
    fresh.update(features, labels)
    assert close(fresh.compute(), logme(features, labels, num_classes=3))


def test_update_does_not_modify_inputs(device):
    f = torch.randn(20, 5, device=device)
    y = torch.randint(0, 3, (20,), device=device)
    f0, y0 = f.clone(), y.clone()
    acc = LogMEAccumulator(5)
    acc.update(f, y)
    acc.compute()
    assert torch.equal(f, f0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    "make, features, targets, exc, match",
    [
        (lambda: LogMEAccumulator(4), torch.randn(3, 5), torch.zeros(3, dtype=torch.long), ValueError, r"\[B, 4\]"),
        (lambda: LogMEAccumulator(4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long), ValueError, "disagree on N"),
        (lambda: LogMEAccumulator(4), torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.long),
         ValueError, "NaN"),
        (lambda: LogMEAccumulator(4), torch.randn(3, 4), torch.tensor([0, -1, 1]), ValueError, "non-negative"),
        (lambda: LogMEAccumulator(2, regression=True, num_targets=2), torch.randn(3, 2), torch.randn(3, 3),
         ValueError, "columns"),
    ],
)
def test_update_rejects(make, features, targets, exc, match):
    with pytest.raises(exc, match=match):
        make().update(features, targets)


def test_constructor_and_compute_errors():
    with pytest.raises(ValueError, match="num_features"):
        LogMEAccumulator(0)
    with pytest.raises(ValueError, match="classification only"):
        LogMEAccumulator(3, 2, regression=True)
    with pytest.raises(ValueError, match="regression only"):
        LogMEAccumulator(3, num_targets=2)
    with pytest.raises(ValueError, match="method"):
        LogMEAccumulator(3, method="nope")
    acc = LogMEAccumulator(3, 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.compute()
    acc.update(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))  # an all-zero batch is fine...
    with pytest.raises(ValueError, match="all zero"):
        acc.compute()  # ...but not all-zero data
    with pytest.raises(ValueError, match="reduction"):
        acc.compute(reduction="max")
    with pytest.raises(RuntimeError, match="process group"):
        acc.sync()


def test_state_without_a_shift_is_of_the_raw_features():
    """A checkpoint saved before accumulators had a shift holds sums of the features themselves."""
    from torch_logme.streaming import _as_statistics

    f, y = make_features(300, 6, 3, seed=5)
    ft, yt = torch.from_numpy(f) + 50.0, torch.from_numpy(y)
    old = LogMEAccumulator(6)
    old.update(ft[:100], yt[:100])
    state = old.state_dict()
    raw = _as_statistics(state, state["shift"]).recentred_by(state["shift"])  # sums of x + shift = f
    state.update(gram=raw.gram, feature_sum=raw.feature_sum, cross=raw.cross)
    del state["shift"]
    restored = LogMEAccumulator(6)
    restored.load_state_dict(state)
    restored.update(ft[100:], yt[100:])
    assert torch.allclose(restored.compute(), logme(ft, yt), rtol=1e-10, atol=0)
