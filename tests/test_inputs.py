"""Bad input: a clear, specific error before any heavy work, for every entry point."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from torch_logme import LogME, logme, spectrum, sums

from conftest import make_features

F, Y = make_features(20, 4, 3, seed=0)


def _nan_features():
    f = F.copy()
    f[3, 1] = np.nan
    return f


def _inf_features():
    f = F.copy()
    f[0, 0] = -np.inf
    return f


# (features, targets, extra keywords, exception, message fragment)
BAD_INPUTS = {
    "features 1-D": (F[:, 0], Y, {}, ValueError, "2-D"),
    "features 3-D": (F.reshape(20, 2, 2), Y, {}, ValueError, "2-D"),
    "length mismatch": (F, Y[:-1], {}, ValueError, "disagree on N"),
    "no samples": (F[:0], Y[:0], {}, ValueError, "at least 2 samples"),
    "one sample": (F[:1], Y[:1], {}, ValueError, "at least 2 samples"),
    "no feature dims": (F[:, :0], Y, {}, ValueError, "D = 0"),
    "NaN features": (_nan_features(), Y, {}, ValueError, "NaN or Inf"),
    "Inf features": (_inf_features(), Y, {}, ValueError, "NaN or Inf"),
    "NaN targets": (F, np.where(np.arange(20) == 2, np.nan, 1.0), {"regression": True}, ValueError, "NaN or Inf"),
    "negative labels": (F, Y - 1, {}, ValueError, "non-negative"),
    "non-integer labels": (F, Y + 0.5, {}, ValueError, "must be integers"),
    "2-D labels": (F, np.stack([Y, Y], 1), {}, ValueError, "1-D"),
    "all-zero features": (np.zeros((20, 4)), Y, {}, ValueError, "all zero"),
    "string regression target": (F, np.array(["a"] * 20), {"regression": True}, TypeError, "real numbers"),
    "object regression target": (F, np.array([None] * 20), {"regression": True}, TypeError, "real numbers"),
    "complex features": (F.astype(np.complex128), Y, {}, TypeError, "real numbers"),
    "list features": (F.tolist(), Y, {}, TypeError, "torch.Tensor or numpy.ndarray"),
    "regression 3-D targets": (F, np.zeros((20, 2, 2)), {"regression": True}, ValueError, r"\[N\] or \[N, C\]"),
    "unknown method": (F, Y, {"method": "newton"}, ValueError, "method must be one of"),
    "unknown solver": (F, Y, {"solver": "qr"}, ValueError, "solver must be one of"),
    "bad dtype": (F, Y, {"dtype": torch.float16}, ValueError, "dtype must be"),
    "bad max_iter": (F, Y, {"max_iter": 0}, ValueError, "max_iter"),
    "bad tol": (F, Y, {"tol": -1.0}, ValueError, "tol"),
    "nan tol": (F, Y, {"tol": float("nan")}, ValueError, "tol"),
    "bad legacy flag": (F, Y, {"legacy_evidence": "yes"}, TypeError, "legacy_evidence"),
    "bad device": (F, Y, {"device": "not-a-device"}, ValueError, "device"),
}

FUNCTIONAL_ONLY = {
    "unknown reduction": (F, Y, {"reduction": "max"}, ValueError, "reduction must be one of"),
    "num_classes too small": (F, Y, {"num_classes": 2}, ValueError, "out of range"),
    "num_classes not positive": (F, Y, {"num_classes": 0}, ValueError, "num_classes"),
    "num_classes with regression": (F, Y, {"num_classes": 3, "regression": True}, ValueError, "classification only"),
}


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the Gram matrix or an eigendecomposition is reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the input was rejected")

    monkeypatch.setattr(sums, "row_chunks", forbidden)
    # spectrum imports column_chunks by name (the dual route's kernel): patch it where it is called.
    monkeypatch.setattr(spectrum, "column_chunks", forbidden)
    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)


def _split(kwargs):
    ctor = {k: v for k, v in kwargs.items() if k not in ("reduction", "num_classes")}
    regression = ctor.pop("regression", False)
    return regression, ctor


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_functional_rejects(case, no_heavy_work):
    f, y, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        logme(f, y, **kwargs)


@pytest.mark.parametrize("case", FUNCTIONAL_ONLY.values(), ids=FUNCTIONAL_ONLY.keys())
def test_functional_only_options(case, no_heavy_work):
    f, y, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        logme(f, y, **kwargs)


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_estimator_rejects(case, no_heavy_work):
    f, y, kwargs, exc, match = case
    regression, ctor = _split(kwargs)
    with pytest.raises(exc, match=match):
        LogME(regression, **ctor).fit(f, y)


def _has_tensor_form(case) -> bool:
    f, y = case[0], case[1]
    return all(isinstance(a, np.ndarray) and a.dtype.kind in "biufc" for a in (f, y))


TORCH_CASES = {name: case for name, case in BAD_INPUTS.items() if _has_tensor_form(case)}


@pytest.mark.parametrize("case", TORCH_CASES.values(), ids=TORCH_CASES.keys())
def test_torch_inputs_rejected_alike(device, case, no_heavy_work):
    f, y, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device), **kwargs)


def test_rejected_fit_keeps_previous_state():
    est = LogME()
    est.fit(F, Y)
    before = est.ms.clone()
    with pytest.raises(ValueError):
        est.fit(_nan_features(), Y)
    assert torch.equal(est.ms, before)


def test_predict_errors():
    est = LogME()
    with pytest.raises(RuntimeError, match="before fit"):
        est.predict(F)
    est.fit(F, Y)
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        est.predict(F[:, :3])


def test_regression_flag_type():
    with pytest.raises(TypeError, match="regression must be a bool"):
        LogME("yes")
    with pytest.raises(TypeError, match="regression must be a bool"):
        logme(F, Y, regression=1)


def test_accepted_label_forms():
    base = logme(F, Y).item()
    assert logme(F, Y.astype(np.float32)).item() == base  # integral floats are labels
    assert logme(F, Y.reshape(-1, 1)).item() == base  # [N, 1] is [N]
    assert logme(F, Y.astype(np.uint8)).item() == base
    assert logme(F.astype(np.int64), Y).item() == logme(F.astype(np.int64).astype(np.float64), Y).item()
    assert logme(torch.from_numpy(F), torch.from_numpy(Y) == 1).item() == logme(F, (Y == 1).astype(int)).item()


def test_unusual_numpy_layouts():
    base = logme(F, Y).item()
    reversed_rows = logme(F[::-1], Y[::-1]).item()  # negative strides
    assert reversed_rows == pytest.approx(base, rel=1e-12)
    assert logme(F.astype(">f8"), Y.astype(">i8")).item() == pytest.approx(base, rel=1e-12)
    frozen = F.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logme(frozen, Y).item() == base
