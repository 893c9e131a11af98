"""Choosing the fixed-point backend in Python (today) against letting torch's dispatcher choose.

Usage::

    python benchmarks/dispatch_table.py [--shapes all|small] [--repeat N] [--threads N] [--sample-ms MS]
                                        [--clock cpu|wall]

Today ``torch_logme.evidence.fixed_point`` picks the backend itself: the
compiled op ``torch_logme::fixed_point`` when ``extension_available(device)``
(which asks the dispatcher, once per device type, whether the library
registered a kernel there) and the spectrum is in the op's range, else the
pure-torch loop ``_fixed_point_torch``. The alternative timed here registers
that loop as the op's ``CompositeExplicitAutograd`` kernel, so one call
``torch.ops.<ns>.fixed_point`` reaches the C++/CUDA kernel where the library
has one and the pure-torch kernel everywhere else:

- compiled kernel: the op of the built library (``torch_logme::fixed_point``),
  with the pure-torch kernel added as its CompositeExplicitAutograd kernel;
  on the CPU the dispatcher still picks the C++ kernel.
- pure-torch kernel: an op defined from Python with the same schema and only
  that kernel (``torch_logme_dispatch_bench::fixed_point``), which is what a
  pure-Python install (no library) would have; on the CPU the dispatcher calls
  back into Python.

Both routes keep what the dispatcher cannot decide: the run-time switch
``TORCH_LOGME_DISABLE_EXTENSION``, the dtype check and the range check on
the largest eigenvalue (a value, not a dispatch key). "kernel alone" is the
floor: the op (or ``_fixed_point_torch``) called with no routing at all.

For each (k, C) the spectrum of Gaussian class features [N, k] (N = 2k, at
least 2000) is computed once, in float64. Every route is first run once and
its outputs (alpha, beta, t, evidence, steps) must equal today's to 1e-12
relative, with the kernel it claims (a counter in the Python kernel); then
the routes are timed interleaved round by round (``table.time_interleaved``),
each sample being as many back-to-back calls as fill ``--sample-ms``, and the
median per call is shown. The clock is the process's CPU time by default
(``--clock cpu``): the differences sought are microseconds, and on a small
shared machine the wall clock also counts the time other processes take
(``--clock wall`` counts it). Set ``OMP_NUM_THREADS=1`` there too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import machine_header, make_problem, time_interleaved  # noqa: E402

from torch_logme import _extension  # noqa: E402
from torch_logme._checks import prepare  # noqa: E402
from torch_logme._options import LogMEOptions, logme_options  # noqa: E402
from torch_logme.evidence import (  # noqa: E402
    _COMPILED_DTYPES,
    FixedPointResult,
    _fixed_point_torch,
    _logdet_weights,
    _within_compiled_range,
    fixed_point,
)
from torch_logme.functional import solve  # noqa: E402
from torch_logme.spectrum import Spectrum  # noqa: E402

#: (k eigenvalues, C columns) of the fixed point; "small" is the first only.
SHAPES: List[Tuple[int, int]] = [(64, 10), (768, 10), (2048, 1000)]
OP = "torch_logme::fixed_point"
#: The op a pure-Python install would define: the library's schema, the pure-torch kernel only.
BENCH_NS = "torch_logme_dispatch_bench"
SCHEMA = (
    "(Tensor eigenvalues, Tensor proj_sq, Tensor target_sq, Tensor? whitened_sq, Tensor? outside_sq, "
    "Tensor? logdet_weights, int num_samples, int num_features, int max_iter, float tol, bool strict) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
CHECK_RTOL = 1e-12
FIELDS = ("alpha", "beta", "t", "evidence")

# Calls of the pure-torch kernel through the dispatcher: shows which kernel a route reached.
_python_kernel_calls = 0
# (max_iter, tol, strict, legacy) -> options, so the kernel does not re-validate per call.
_options_cache: Dict[Tuple[int, float, bool, bool], LogMEOptions] = {}
# Libraries must stay alive for their registrations to stay.
_libraries: List[torch.library.Library] = []


def pure_torch_kernel(
    eigenvalues: Tensor, proj_sq: Tensor, target_sq: Tensor, whitened_sq: Optional[Tensor],
    outside_sq: Optional[Tensor], logdet_weights: Optional[Tensor], num_samples: int, num_features: int,
    max_iter: int, tol: float, strict: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_fixed_point_torch`` behind the op's schema (options as scalars, log-det weights as a tensor)."""
    global _python_kernel_calls
    _python_kernel_calls += 1
    legacy = logdet_weights is not None
    key = (max_iter, tol, strict, legacy)
    options = _options_cache.get(key)
    if options is None:
        options = _options_cache[key] = logme_options(
            max_iter=max_iter, tol=tol, method="icml" if strict else "fixed_point", legacy_evidence=legacy)
    # The weights keep the `published_rank` largest eigenvalues; the loop rebuilds them from that count.
    rank = int(logdet_weights.sum()) if logdet_weights is not None else None
    r = _fixed_point_torch(eigenvalues, proj_sq, target_sq, num_samples, num_features, options,
                           whitened_sq, outside_sq, rank)
    return r.alpha, r.beta, r.t, r.evidence, r.steps


def fake_kernel(
    eigenvalues: Tensor, proj_sq: Tensor, target_sq: Tensor, whitened_sq: Optional[Tensor],
    outside_sq: Optional[Tensor], logdet_weights: Optional[Tensor], num_samples: int, num_features: int,
    max_iter: int, tol: float, strict: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shapes only, for FakeTensor / torch.compile (as _extension registers for the library's op)."""
    c = proj_sq.shape[0]
    outs = tuple(eigenvalues.new_empty(c) for _ in range(4))
    return outs[0], outs[1], outs[2], outs[3], eigenvalues.new_empty(c, dtype=torch.int64)


def register() -> Tuple[Callable[..., Tuple[Tensor, ...]], Callable[..., Tuple[Tensor, ...]]]:
    """(library op with the pure-torch kernel added, Python-defined op with only that kernel).

    torch.library.Library(..., "FRAGMENT") with define/impl is the registration
    API that torch 2.4 (the oldest supported) and today's torch share.
    """
    if not _extension.load():
        raise SystemExit(f"the compiled extension is not available: {_extension.load_error()}")
    lib = torch.library.Library("torch_logme", "FRAGMENT")
    lib.impl("fixed_point", pure_torch_kernel, "CompositeExplicitAutograd")
    bench = torch.library.Library(BENCH_NS, "FRAGMENT")
    bench.define("fixed_point" + SCHEMA)
    bench.impl("fixed_point", pure_torch_kernel, "CompositeExplicitAutograd")
    _libraries.extend([lib, bench])
    torch.library.register_fake(f"{BENCH_NS}::fixed_point", fake_kernel, lib=bench)
    return torch.ops.torch_logme.fixed_point, getattr(torch.ops, BENCH_NS).fixed_point


def dispatch_fixed_point(op: Callable[..., Tuple[Tensor, ...]], spec: Spectrum, options: LogMEOptions,
                         published_rank: Optional[int] = None) -> FixedPointResult:
    """The dispatcher route: only the checks no dispatch key expresses stay in Python."""
    lam = spec.eigenvalues
    args = (lam, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
            spec.whitened_sq, spec.outside_sq, published_rank)
    if lam.dtype not in _COMPILED_DTYPES or _extension._disabled() or not _within_compiled_range(lam):
        return _fixed_point_torch(*args)
    strict = options.method == "icml"
    weights, _ = _logdet_weights(lam, spec.num_samples, spec.num_features,
                                 options.legacy_evidence and not strict, published_rank)
    outs = op(lam, spec.proj_sq, spec.target_sq, spec.whitened_sq, spec.outside_sq, weights,
              spec.num_samples, spec.num_features, options.max_iter, options.tol, strict)
    return FixedPointResult(*outs)


def set_extension(enabled: bool) -> None:
    """Today's route: the run-time switch picks the pure-torch loop."""
    if enabled:
        os.environ.pop(_extension.DISABLE_ENV, None)
    else:
        os.environ[_extension.DISABLE_ENV] = "1"


def spectrum_of(k: int, c: int) -> Spectrum:
    """Spectrum (k eigenvalues, C columns, float64) of N = max(2k, 2000) Gaussian class features."""
    n = max(2 * k, 2000)
    f, y = make_problem(n, k, c)
    with torch.no_grad():
        inputs = prepare(torch.from_numpy(f), torch.from_numpy(y), regression=False, num_classes=c,
                         device=torch.device("cpu"))
        spec, _ = solve(inputs, logme_options(), with_basis=False)
    assert spec.eigenvalues.shape[0] == k and spec.proj_sq.shape[0] == c
    return spec


def max_rel_diff(got: FixedPointResult, want: FixedPointResult) -> float:
    """Largest |got - want| / |want| over the fields; inf when the step counts differ."""
    if not torch.equal(got.steps, want.steps):
        return float("inf")
    worst = 0.0
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        worst = max(worst, ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item())
    return worst


def routes(spec: Spectrum, library_op: Callable[..., Tuple[Tensor, ...]],
           python_op: Callable[..., Tuple[Tensor, ...]]) -> Dict[str, Dict[str, Callable[[], FixedPointResult]]]:
    """kernel -> {"today", "dispatcher", "kernel alone"} -> one call (switch already set)."""
    options = logme_options()
    op_args = (spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.whitened_sq, spec.outside_sq, None,
               spec.num_samples, spec.num_features, options.max_iter, options.tol, False)
    torch_args = (spec.eigenvalues, spec.proj_sq, spec.target_sq, spec.num_samples, spec.num_features, options,
                  spec.whitened_sq, spec.outside_sq, None)
    return {
        "compiled": {
            "today": lambda: fixed_point(spec, options),
            "dispatcher": lambda: dispatch_fixed_point(library_op, spec, options),
            "kernel alone": lambda: FixedPointResult(*library_op(*op_args)),
        },
        "pure torch": {
            "today": lambda: fixed_point(spec, options),
            "dispatcher": lambda: dispatch_fixed_point(python_op, spec, options),
            "kernel alone": lambda: _fixed_point_torch(*torch_args),
        },
    }


def check_routes(table: Dict[str, Dict[str, Callable[[], FixedPointResult]]]) -> Tuple[bool, float]:
    """Every route gives today's outputs, through the kernel it claims: (ok, worst relative difference)."""
    ok, worst = True, 0.0
    for kernel, fns in table.items():
        set_extension(True)  # the dispatcher routes run with the switch off
        before = _python_kernel_calls
        for name in ("dispatcher", "kernel alone"):
            fns[name]()
        through_python = _python_kernel_calls - before
        # The compiled kernel must not call back into Python; the pure-torch one must, once (dispatcher).
        ok = ok and through_python == (0 if kernel == "compiled" else 1)
        set_extension(kernel == "compiled")
        want = fns["today"]()
        set_extension(True)
        for name in ("dispatcher", "kernel alone"):
            err = max_rel_diff(fns[name](), want)
            worst = max(worst, err)
            ok = ok and err <= CHECK_RTOL
    return ok, worst


def timed_fn(fn: Callable[[], FixedPointResult], calls: int, extension: bool) -> Callable[[], float]:
    """``calls`` back-to-back calls of fn with the run-time switch set as the route needs; returns a score."""
    def run() -> float:
        set_extension(extension)
        try:
            with torch.no_grad():  # as logme calls it
                for _ in range(calls):
                    out = fn()
        finally:
            set_extension(True)
        return float(out.evidence[0])
    return run


def calls_per_sample(fn: Callable[[], FixedPointResult], sample_s: float, clock: Callable[[], float]) -> int:
    """How many calls of fn fill about ``sample_s`` seconds (at least 1): the fastest of three calls decides."""
    fn()
    one = float("inf")
    for _ in range(3):
        t0 = clock()
        fn()
        one = min(one, clock() - t0)
    return max(1, int(sample_s / max(one, 1e-7)))


def run(shapes: List[Tuple[int, int]], repeat: int, sample_s: float, clock: Callable[[], float]) -> bool:
    """Print the table; returns False when a route disagreed with today's."""
    library_op, python_op = register()
    print("| k, C | kernel | today µs | dispatcher µs | dispatcher − today µs | dispatcher / today "
          "| kernel alone µs | max rel. diff | calls × runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for k, c in shapes:
        spec = spectrum_of(k, c)
        table = routes(spec, library_op, python_op)
        ok, worst = check_routes(table)
        if not ok:
            all_ok = False
            print(f"CHECK FAILED at (k, C) = ({k}, {c}): worst relative difference {worst:.2e}, "
                  "or a route reached the wrong kernel", file=sys.stderr)
            continue
        for kernel, fns in table.items():
            set_extension(kernel == "compiled")
            with torch.no_grad():
                calls = calls_per_sample(fns["today"], sample_s, clock)
            set_extension(True)
            timed = time_interleaved({
                "today": timed_fn(fns["today"], calls, extension=kernel == "compiled"),
                "dispatcher": timed_fn(fns["dispatcher"], calls, extension=True),
                "kernel alone": timed_fn(fns["kernel alone"], calls, extension=True),
            }, repeat, budget_s=float("inf"), clock=clock)
            us = {name: timed[name][0] / calls * 1e6 for name in timed}
            print(f"| {k}, {c} | {kernel} | {us['today']:.1f} | {us['dispatcher']:.1f} "
                  f"| {us['dispatcher'] - us['today']:+.1f} | {us['dispatcher'] / us['today']:.3f} "
                  f"| {us['kernel alone']:.1f} | {worst:.1e} | {calls} × {timed['today'][2]} |", flush=True)
    return all_ok


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["small", "all"], default="all",
                        help="small: (k, C) = (64, 10) only; all: also (768, 10) and (2048, 1000)")
    parser.add_argument("--repeat", type=int, default=9, help="timed samples per cell, the median is shown (>= 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--sample-ms", type=float, default=20.0,
                        help="back-to-back calls per timed sample, enough to fill this many ms")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: CPU time of this process (default; other processes' load left out); wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.shapes == "small" else SHAPES
    print(machine_header())
    print()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    what = "CPU time of the process" if args.clock == "cpu" else "wall time"
    print(f"CPU, float64, {what}. Per call: median of {args.repeat} samples, routes interleaved round by round; "
          f"each sample is as many back-to-back calls as fill {args.sample_ms:g} ms (calls column). "
          "today: evidence.fixed_point; dispatcher: one op call whose kernel torch picks; "
          "kernel alone: no routing.")
    print()
    ok = run(shapes, args.repeat, args.sample_ms / 1e3, clock)
    print()
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not ok:
        print("check: FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
