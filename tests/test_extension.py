"""The compiled fixed point (csrc/) against the pure-torch one, on every device in DEVICES.

Both implementations are called directly (``_fixed_point_compiled`` and
``_fixed_point_torch``), so the comparison does not depend on the routing;
the routing and the fallback have tests of their own. The compiled tests
skip where the extension is not built for the device (a pure-Python
install); the fallback tests run everywhere.
"""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import torch_logme
from torch_logme import _extension, evidence, logme
from torch_logme import spectrum as _spectrum
from torch_logme._options import logme_options
from torch_logme.sums import compute_statistics

from conftest import DTYPES, make_features

RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# The pure-torch float32 path itself drifts from float64 by up to ~2e-5 (it
# sums in float32, over up to 11 steps of a slowly converging column), so the
# compiled float32 op is held to the float64 result at RTOL, and to the
# pure-torch float32 result only at this bound.
RTOL_F32_VS_TORCH_F32 = 1e-4
FIELDS = ("alpha", "beta", "t", "evidence")


@pytest.fixture
def compiled(device: str) -> str:
    """The device, when the compiled op serves it; skip otherwise."""
    if not torch_logme.extension_available(device):
        why = _extension.load_error() or f"no {device} kernel"
        if _extension._disabled():
            why = f"{_extension.DISABLE_ENV} is set"
        pytest.skip(f"compiled extension not in use for {device}: {why}")
    return device


def spectrum_of(n: int, d: int, c: int, *, seed: int = 0, form: str = "auto", dtype=torch.float64, device="cpu"):
    """Spectrum of Gaussian class features: primal (N > D), dual or svd (whitened form)."""
    f, y = make_features(n, d, c, seed=seed)
    f, y = torch.from_numpy(f), torch.from_numpy(y)
    if form == "auto":
        form = "primal" if n > d else "dual"
    if form == "primal":
        spec = _spectrum.primal(compute_statistics(f, y, c, True, dtype), with_basis=False)
    else:
        spec = getattr(_spectrum, form)(f, y, c, True, dtype, with_basis=False)
    return as_inputs(spec.eigenvalues, spec.proj_sq, spec.target_sq, n, d, device, spec.whitened_sq, spec.outside_sq)


def as_inputs(lam, proj, target, n, d, device, whitened=None, outside=None) -> dict:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(
        eigenvalues=move(lam), proj_sq=move(proj), target_sq=move(target), num_samples=n, num_features=d,
        whitened_sq=move(whitened), outside_sq=move(outside),
    )


def run_both(inputs: dict, **options):
    """(compiled, pure torch) results of the same fixed point."""
    opts = logme_options(**options)
    args = [inputs[k] for k in ("eigenvalues", "proj_sq", "target_sq", "num_samples", "num_features")]
    extra = (inputs.get("whitened_sq"), inputs.get("outside_sq"))
    return (
        evidence._fixed_point_compiled(*args, opts, *extra),
        evidence._fixed_point_torch(*args, opts, *extra),
    )


def errors(got, want, name: str):
    """|got - want| / scale per column, for one output field.

    The evidence is measured against the largest |evidence| of the columns:
    it is a difference of O(1) terms, so a column whose evidence is near 0
    carries the round-off of those terms, not of its own size.
    """
    a, b = getattr(got, name).double(), getattr(want, name).double().to(getattr(got, name).device)
    scale = b.abs()
    if name == "evidence":
        scale = scale.clamp_min(scale.max())
    return (a - b).abs() / scale


def check(inputs: dict, dtype, rtol=None, vs_torch_f32=True, **options):
    """Compiled == pure torch on ``inputs``; returns the pure-torch result.

    float64: every output to 1e-12 relative, and the same step counts.
    float32: the compiled op sums in float64 whatever the input dtype, so it
    must equal the pure-torch fixed point run in float64 on the same
    (float32) inputs to 1e-6, with the same steps. Against the pure-torch
    float32 path it must agree to 1e-4 on the columns that path stops on the
    same step (its float32 round-off can move a column across the tolerance).
    ``vs_torch_f32=False`` skips that comparison where the float32 path is
    known to be inaccurate.
    """
    got, want = run_both(inputs, **options)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == dtype and a.device == b.device and a.shape == b.shape, name
    assert got.steps.dtype == torch.int64
    exact = want
    if dtype == torch.float32:
        exact = run_both({k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}, **options)[1]
        same = (want.steps == exact.steps) & vs_torch_f32
        for name in FIELDS:
            err = errors(got, want, name)[same].max().item() if same.any() else 0.0
            assert err <= RTOL_F32_VS_TORCH_F32, f"{name}: {err:.3g} from pure torch float32"
    rtol = rtol or RTOL[dtype]
    for name in FIELDS:
        err = errors(got, exact, name).max().item()
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"
    assert torch.equal(got.steps, exact.steps), (got.steps, exact.steps)
    return want


# -- compiled == pure torch --------------------------------------------------

SHAPES = {"N>D": (300, 40, 10), "N<D": (30, 80, 5), "N=D": (40, 40, 4), "many": (2000, 64, 50)}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["fixed_point", "icml"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_torch(compiled, shape, method, dtype):
    # N <= D comes in the whitened form (dual), as logme passes it.
    check(spectrum_of(*shape, seed=sum(shape), dtype=dtype, device=compiled), dtype, method=method)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("form", ["dual", "svd"])
@pytest.mark.parametrize("legacy", [False, True], ids=["correct", "legacy"])
@pytest.mark.parametrize("method", ["fixed_point", "icml"])
def test_whitened_form_and_legacy_weights(compiled, form, legacy, method, dtype):
    # N < D: k = N eigenvalues plus D - N implicit zeros, or, with the
    # legacy weights, log|A| over the published rank truncation only.
    inputs = spectrum_of(30, 50, 3, seed=5, form=form, dtype=dtype, device=compiled)
    assert inputs["whitened_sq"] is not None
    check(inputs, dtype, legacy_evidence=legacy, method=method)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("legacy", [False, True], ids=["correct", "legacy"])
def test_zero_eigenvalues_rank_deficient(compiled, legacy, dtype):
    # N > D with repeated feature columns: the primal form gets exact zero
    # eigenvalues (clamped round-off) and the legacy weights drop them.
    f, y = make_features(200, 12, 4, seed=6)
    f = torch.from_numpy(f).repeat(1, 3)
    stats = compute_statistics(f, torch.from_numpy(y), 4, True, dtype)
    spec = _spectrum.primal(stats, with_basis=False)
    spec.eigenvalues[:24] = 0  # the 24 null directions, exactly 0 (as round-off below 0 would be)
    inputs = as_inputs(spec.eigenvalues, spec.proj_sq, spec.target_sq, 200, 36, compiled)
    check(inputs, dtype, legacy_evidence=legacy)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_primal_form_when_n_below_d(compiled, dtype):
    # The streaming accumulator scores N < D in the primal form, where the
    # residual y^T y - sum(...) cancels to ~0: both paths carry that
    # subtraction's round-off (their sums add in different orders), hence
    # 1e-9 here instead of 1e-12. In float32 that cancellation leaves the
    # pure-torch path ~1e-3 off (why logme uses the whitened form for N <= D),
    # so float32 is compared with float64 only.
    inputs = spectrum_of(30, 50, 3, seed=5, form="primal", dtype=dtype, device=compiled)
    assert (inputs["eigenvalues"] == 0).any()
    check(inputs, dtype, rtol=1e-9 if dtype == torch.float64 else None, vs_torch_f32=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_single_eigenvalue(compiled, dtype):
    inputs = spectrum_of(50, 1, 3, seed=1, dtype=dtype, device=compiled)
    assert inputs["eigenvalues"].shape == (1,)
    check(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("num_columns", [1, 5000])
def test_column_counts(compiled, num_columns, dtype):
    inputs = spectrum_of(6000 if num_columns > 1 else 200, 48, num_columns, seed=3, dtype=dtype, device=compiled)
    assert inputs["proj_sq"].shape == (num_columns, 48)
    check(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_steps_differ_and_hit_max_iter(compiled, dtype):
    # Columns stop on different steps; with few steps some hit max_iter.
    inputs = spectrum_of(500, 100, 20, seed=4, dtype=dtype, device=compiled)
    assert check(inputs, dtype).steps.unique().numel() >= 2
    steps = check(inputs, dtype, max_iter=3).steps
    assert (steps == 3).any() and (steps < 3).any()
    assert (check(inputs, dtype, max_iter=1, tol=1e-12).steps == 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_literal_zero_eigenvalues_and_empty_column(compiled, dtype):
    # Exact zeros in the spectrum and a column with no signal (z = 0): no
    # division by an eigenvalue, every output finite.
    g = torch.Generator().manual_seed(0)
    k, c = 37, 6
    lam = torch.rand(k, generator=g, dtype=torch.float64) * 100
    lam[::4] = 0
    proj = torch.rand(c, k, generator=g, dtype=torch.float64) * lam
    proj[0] = 0
    target = proj.sum(1) / lam.clamp_min(1).mean() + 10
    inputs = as_inputs(lam.to(dtype), proj.to(dtype), target.to(dtype), 80, 60, compiled)
    result = check(inputs, dtype)
    assert torch.isfinite(result.evidence).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_eigenvalues_spanning_many_decades(compiled, dtype):
    # log|A| is summed over products of several terms on the CPU; with
    # eigenvalues from 1e-30 to 1e30 fewer terms fit in one product.
    g = torch.Generator().manual_seed(1)
    k, c = 200, 4
    lam = 10.0 ** torch.linspace(-30, 30, k, dtype=torch.float64)
    proj = torch.rand(c, k, generator=g, dtype=torch.float64) * lam
    target = (proj / lam).sum(1) * 2
    inputs = as_inputs(lam.to(dtype), proj.to(dtype), target.to(dtype), 500, 300, compiled)
    # In float32 the squares of 1 / (t + lam) leave float32's range, so the
    # pure-torch float32 loop is off there; the op (float64 inside) is not.
    check(inputs, dtype, vs_torch_f32=False)


@pytest.mark.parametrize("num_samples", [3, 5])
def test_degenerate_columns_are_nan_like_torch(compiled, num_samples):
    # Inputs no real spectrum gives (N below the effective number of
    # parameters): beta turns negative, log|A| has negative factors, and the
    # evidence is NaN on both paths, column for column.
    g = torch.Generator().manual_seed(3)
    k, c = 40, 4
    lam = torch.rand(k, generator=g, dtype=torch.float64) * 10
    proj = torch.rand(c, k, generator=g, dtype=torch.float64) * lam
    got, want = run_both(as_inputs(lam, proj, (proj / lam).sum(1) + 1, num_samples, 60, compiled))
    assert (want.beta < 0).any()
    assert torch.equal(got.evidence.isnan(), want.evidence.isnan())
    finite = ~want.evidence.isnan()
    torch.testing.assert_close(got.evidence[finite], want.evidence[finite], rtol=1e-9, atol=0)
    torch.testing.assert_close(got.beta, want.beta, rtol=1e-12, atol=0)


def test_fractional_logdet_weights(compiled):
    # The op takes any weights; Python passes 0/1 (the published truncation).
    # Halving every weight halves the weighted log|A| and drops the D - k zeros.
    args = list(op_args(compiled, whitened=False, weights=False))
    lam, n, d = args[0], args[6], args[7]
    full = _extension.fixed_point_op(*args)
    args[5] = torch.full_like(lam, 0.5)
    half = _extension.fixed_point_op(*args)
    assert torch.equal(full[0], half[0]) and torch.equal(full[1], half[1])  # the iteration ignores weights
    alpha, beta = full[0].unsqueeze(1), full[1].unsqueeze(1)
    logdet_k = torch.log(alpha + beta * lam).sum(1)
    # evidence = (... - 0.5 log|A| ...) / N with log|A| = logdet_k + (D - k) log(alpha), or 0.5 logdet_k
    shift = 0.5 * (logdet_k + (d - lam.shape[0]) * torch.log(full[0]) - 0.5 * logdet_k) / n
    torch.testing.assert_close(half[3], full[3] + shift, rtol=1e-12, atol=1e-12)


# -- the op itself: schema, fake kernel, torch.compile, input checks -----------------


def op_args(device: str, *, whitened: bool, weights: bool):
    inputs = spectrum_of(30, 50, 3, seed=2, form="dual" if whitened else "primal", device=device)
    k = inputs["eigenvalues"].shape[0]
    w = torch.ones(k, dtype=torch.float64, device=device) if weights else None
    return (
        inputs["eigenvalues"], inputs["proj_sq"], inputs["target_sq"],
        inputs["whitened_sq"] if whitened else None, inputs["outside_sq"] if whitened else None, w,
        30, 50, 11, 1e-3, False,
    )


@pytest.mark.parametrize("whitened", [False, True], ids=["primal", "whitened"])
@pytest.mark.parametrize("weights", [False, True], ids=["all", "weights"])
def test_opcheck(compiled, whitened, weights):
    torch.library.opcheck(
        torch.ops.torch_logme.fixed_point.default, op_args(compiled, whitened=whitened, weights=weights)
    )


def test_torch_compile_fullgraph(compiled):
    """torch.compile traces through the op on every device: the fake kernel runs on fake tensors there."""
    import torch._dynamo

    args = op_args(compiled, whitened=False, weights=False)

    def score(lam, proj, target):
        return _extension.fixed_point_op(lam, proj, target, *args[3:])[3].mean()

    traced = []

    def recording_backend(gm, example_inputs):
        # Dynamo stores the op's outputs as the fake kernel made them.
        for node in gm.graph.nodes:
            if node.op == "call_function" and "torch_logme" in str(node.target):
                traced.append(node.meta["example_value"])
        return gm.forward

    torch._dynamo.reset()
    try:
        want = score(*args[:3])
        assert torch.equal(torch.compile(score, backend=recording_backend, fullgraph=True)(*args[:3]), want)
        assert len(traced) == 1, "the op is not in the traced graph"
        outputs = traced[0]
        assert [o.device.type for o in outputs] == [compiled] * 5
        assert [tuple(o.shape) for o in outputs] == [(3,)] * 5
        assert [o.dtype for o in outputs] == [torch.float64] * 4 + [torch.int64]
        torch._dynamo.reset()
        # The default backend (inductor) compiles the graph around the op.
        compiled_score = torch.compile(score, fullgraph=True)
        assert torch.allclose(compiled_score(*args[:3]), want, rtol=1e-12, atol=0)
    finally:
        torch._dynamo.reset()
        # On torch 2.4 (CI's oldest environment) inductor builds its C++ kernels with -ffast-math; loading
        # one turns on flush-to-zero for the whole process: subnormal features then read
        # as 0 in every later test. Turn it off again.
        torch.set_flush_denormal(False)


BAD = {
    "eigenvalues 2-D": lambda a: (a[0][None],) + a[1:],
    "proj_sq wrong k": lambda a: (a[0], a[1][:, 1:]) + a[2:],
    "target_sq wrong C": lambda a: a[:2] + (a[2][1:],) + a[3:],
    "dtype mismatch": lambda a: (a[0], a[1].float()) + a[2:],
    "whitened without outside": lambda a: a[:3] + (a[1], None) + a[5:],
    "weights wrong k": lambda a: a[:5] + (a[0][1:],) + a[6:],
    "integer eigenvalues": lambda a: (a[0].long(), a[1].long(), a[2].long()) + a[3:],
    "D < k": lambda a: a[:7] + (1,) + a[8:],
    "max_iter 0": lambda a: a[:8] + (0,) + a[9:],
    "tol 0": lambda a: a[:9] + (0.0,) + a[10:],
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_op_rejects_bad_inputs(compiled, bad):
    with pytest.raises(RuntimeError, match="fixed_point"):
        _extension.fixed_point_op(*bad(op_args(compiled, whitened=False, weights=False)))


# -- routing and fallback --------------------------------------------------------------


def test_routing_uses_compiled_op(compiled, monkeypatch):
    calls = []
    real = evidence._fixed_point_compiled
    monkeypatch.setattr(evidence, "_fixed_point_compiled", lambda *a: calls.append(1) or real(*a))
    f, y = make_features(100, 20, 3, seed=0)
    fast = logme(torch.from_numpy(f).to(compiled), torch.from_numpy(y).to(compiled), reduction="none")
    assert calls, "logme did not run the compiled op"
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    assert not torch_logme.extension_available(compiled)
    calls.clear()
    slow = logme(torch.from_numpy(f).to(compiled), torch.from_numpy(y).to(compiled), reduction="none")
    assert not calls, "TORCH_LOGME_DISABLE_EXTENSION=1 did not force the pure-torch path"
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["fixed_point", "icml"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_logme_same_with_and_without_extension(device, method, dtype, monkeypatch):
    # Runs everywhere: with the extension built it compares both paths end to
    # end; without it both calls take the pure-torch path.
    f, y = make_features(60, 80, 4, seed=9)
    f, y = torch.from_numpy(f).to(device), torch.from_numpy(y).to(device)
    default = logme(f, y, reduction="none", method=method, dtype=dtype)
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    fallback = logme(f, y, reduction="none", method=method, dtype=dtype)
    rtol = RTOL[dtype] if dtype == torch.float64 else RTOL_F32_VS_TORCH_F32
    torch.testing.assert_close(default, fallback, rtol=rtol, atol=rtol * fallback.abs().max().item())


def test_fallback_when_library_missing(device, monkeypatch):
    # A pure-Python install: no library, no warning, same scores.
    monkeypatch.delenv(_extension.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    f, y = make_features(50, 10, 3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch_logme.extension_available(device)
        score = logme(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device))
    assert torch.isfinite(score)
    assert "not built" in _extension.load_error()
    with pytest.raises(RuntimeError, match="not available"):
        _extension.fixed_point_op(*op_args("cpu", whitened=False, weights=False))


def test_broken_library_warns_once(tmp_path, monkeypatch):
    bogus = tmp_path / "_C.so"
    bogus.write_bytes(b"not a shared library")
    spec = importlib.util.spec_from_file_location("torch_logme._C", bogus)
    monkeypatch.delenv(_extension.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.warns(RuntimeWarning, match="failed to load") as record:
        assert not torch_logme.extension_available("cpu")
        assert not torch_logme.extension_available("cpu")
        f, y = make_features(50, 10, 3, seed=1)
        logme(torch.from_numpy(f), torch.from_numpy(y))
    assert len([w for w in record if "failed to load" in str(w.message)]) == 1


def test_unsupported_devices_and_dtypes(monkeypatch):
    assert not torch_logme.extension_available("meta")
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    assert not torch_logme.extension_available("cpu")
