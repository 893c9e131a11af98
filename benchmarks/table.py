"""Side-by-side timing table of torch_logme against the numpy reference.

Usage::

    python benchmarks/table.py [--shapes small|all|smoke] [--repeat N] [--device cpu|cuda|all]
                               [--budget SECONDS] [--check] [--json PATH]
                               [--floor-device cpu|cuda] [--floor-shape N,D,C] [--reference-budget SECONDS]

Prints a Markdown table (median of ``--repeat`` runs per cell) headed by a
description of the machine. When CUDA is available and selected, a second
section compares end-to-end ``logme`` at (50000, 2048, 1000) with the floor of
the job, the float64 Gram product plus ``eigh``, reports the extra peak GPU
memory, and times the numpy reference on the same problem on the CPU cores
(at full size when that fits ``--reference-budget``, else on fewer rows, and
says so). Runs on CPU-only machines; CUDA parts are skipped there, unless
``--floor-device cpu`` asks for the second section on the CPU (small
``--floor-shape``; that is how gpu_check.sh --cpu-smoke runs it).
``--json PATH`` merges every figure into the ``table`` section of PATH.

The helpers here (``SHAPES``, ``make_problem``, ``warm_up_reference``,
``machine_header``) are shared with ``benchmarks/test_bench_logme.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# Running as `python benchmarks/table.py` from a checkout puts benchmarks/ on
# sys.path, not the repository root; add the root so the uninstalled package imports.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch_logme  # noqa: E402
import torch_logme.reference as _reference  # noqa: E402
from torch_logme import logme  # noqa: E402
from torch_logme.reference import LogME as RefLogME  # noqa: E402

from _results import cpu_model, record  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)

#: (N, D, C) of the CPU/CUDA comparison; "small" is the first one only.
SHAPES: list[tuple[int, int, int]] = [(10_000, 768, 10), (20_000, 1024, 100), (20_000, 1024, 1000)]
#: Tiny shapes for gpu_check.sh --cpu-smoke: the same code, in seconds.
SMOKE_SHAPES: list[tuple[int, int, int]] = [(1_000, 32, 5), (2_000, 64, 20)]
#: Shape of the GPU floor comparison (targets: ratio <= 1.1, extra peak < 1.5 GB).
GPU_SHAPE: tuple[int, int, int] = (50_000, 2048, 1000)
SEED = 0
#: Tolerance of --check: the timed scores must agree with the reference this closely.
CHECK_RTOL = 1e-9
# The reference decides itself whether numba is usable (it also needs SciPy).
HAS_NUMBA: bool = bool(getattr(_reference, "NUMBA_AVAILABLE", importlib.util.find_spec("numba") is not None))
REF_NAME = "reference (numba)" if HAS_NUMBA else "reference (numpy)"


def make_problem(n: int, d: int, c: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic classification problem: features [N, D] float64, labels [N] int64.

    Features are Gaussian around a class-dependent mean, so the classes are
    separable to a degree and the fixed point does real work. The values are
    rounded to float32 and stored as float64, so the float32 copy given to the
    GPU holds exactly the same numbers as the float64 copy given to the CPU
    implementations: every timed run scores the same problem, and --check can
    hold all of them to the same tolerance. Labels are balanced (every class
    occurs N / C times, so C = labels.max() + 1 holds) and shuffled.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % c).astype(np.int64)
    means = rng.standard_normal((c, d), dtype=np.float32) * np.float32(0.5)
    feats = rng.standard_normal((n, d), dtype=np.float32)
    feats += means[labels]
    return feats.astype(np.float64), labels


def warm_up_reference() -> None:
    """Run the reference once on tiny data so numba's JIT compilation is never timed."""
    rng = np.random.default_rng(1)
    labels = np.arange(64) % 4
    RefLogME().fit(rng.standard_normal((64, 8)), labels)  # N > D path
    RefLogME().fit(rng.standard_normal((8, 16)), labels[:8])  # N <= D path


def warm_up_torch(device: torch.device) -> None:
    """One tiny call so one-time library initialisation (LAPACK, cuBLAS, cuSOLVER) is not timed."""
    f = torch.randn(256, 16, device=device)
    y = torch.arange(256, device=device) % 4
    logme(f, y, dtype=torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_header() -> str:
    """Markdown bullet list naming the machine and library versions."""
    numba_version = "not installed"
    if importlib.util.find_spec("numba") is not None:
        import numba

        numba_version = numba.__version__ + ("" if HAS_NUMBA else " (not used by the reference)")
    # Other work on a small machine skews every number: record how busy it was.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), torch threads: {torch.get_num_threads()}, "
        f"load average at start: {load}",
        f"- torch {torch.__version__}, numpy {np.__version__}, numba {numba_version}, "
        f"torch_logme {getattr(torch_logme, '__version__', '?')}, python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("- GPU: none")
    return "\n".join(lines)


def time_interleaved(fns: dict[str, Callable[[], float]], repeat: int, budget_s: float,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, tuple[float, float, int]]:
    """Time each of ``fns`` up to ``repeat`` times, one round of all at a time.

    Returns {name: (median seconds, last result, runs)}. Interleaving the
    implementations round by round means a burst of other work on a shared
    machine slows all of them alike instead of one whole cell. A function
    stops repeating once ``budget_s`` seconds were spent on it, so the slow
    reference (tens of seconds per call at C = 1000) is timed once while the
    fast cells get the full ``repeat``. Each function must block until its
    work is done (synchronize for CUDA) and return the score. ``clock`` is
    wall time by default; ``time.thread_time`` (CPU time of this thread) leaves
    out the time other processes take from a single-threaded CPU run.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, float] = {}
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            if times[name] and sum(times[name]) >= budget_s:
                continue
            t0 = clock()
            results[name] = fn()
            times[name].append(clock() - t0)
    return {name: (statistics.median(ts), results[name], len(ts)) for name, ts in times.items()}


def fmt_time(seconds: float) -> str:
    """Milliseconds below one second, seconds above."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b|, guarded against b == 0."""
    return abs(a - b) / max(abs(b), 1e-300)


def run_table(shapes: list[tuple[int, int, int]], devices: list[str], repeat: int,
              budget_s: float, check: bool, json_path: str | None = None) -> bool:
    """Print the comparison table; returns False when --check found a mismatch.

    With ``json_path``, each row's figures go to ``table.rows["NxDxC"]`` as
    soon as they are measured: ``reference_s``, and per device ``<dev>_s``
    and ``reference_over_<dev>`` (seconds, medians), the runs, and the
    largest relative difference of the scores. ``torch_s`` and
    ``reference_over_torch`` repeat the figures of the last device timed
    (the GPU when there is one).
    """
    cols = ["N, D, C", REF_NAME]
    if "cpu" in devices:
        cols += ["torch_logme CPU", "ref / CPU"]
    if "cuda" in devices:
        cols += ["torch_logme CUDA", "ref / CUDA"]
    if check:
        cols.append("max rel. diff vs ref")
    cols.append("runs (" + " / ".join(["ref"] + [d.upper() for d in devices]) + ")")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")

    ok = True
    warm_up_reference()
    for dev in devices:
        warm_up_torch(torch.device(dev))
    for n, d, c in shapes:
        f_np, y_np = make_problem(n, d, c)
        fns: dict[str, Callable[[], float]] = {"ref": lambda f=f_np, y=y_np: RefLogME().fit(f, y)}
        if "cpu" in devices:
            f_cpu, y_cpu = torch.from_numpy(f_np), torch.from_numpy(y_np)
            fns["cpu"] = lambda f=f_cpu, y=y_cpu: logme(f, y, dtype=torch.float64).item()
        if "cuda" in devices:
            # The features live on the GPU as float32 before the clock starts
            # (the scoring-after-forward-pass case); compute is float64.
            f_gpu = torch.from_numpy(f_np).to("cuda", torch.float32)
            y_gpu = torch.from_numpy(y_np).to("cuda")

            def run_cuda(f: torch.Tensor = f_gpu, y: torch.Tensor = y_gpu) -> float:
                out = logme(f, y, dtype=torch.float64)
                torch.cuda.synchronize()
                return out.item()

            run_cuda()  # allocator and kernel warm-up at this shape
            fns["cuda"] = run_cuda

        timed = time_interleaved(fns, repeat, budget_s)
        t_ref, s_ref, _ = timed["ref"]
        cells = [f"{n}, {d}, {c}", fmt_time(t_ref)]
        for dev in devices:
            cells += [fmt_time(timed[dev][0]), f"{t_ref / timed[dev][0]:.3g}x"]
        scores = {dev: timed[dev][1] for dev in devices}
        runs = [str(timed[name][2]) for name in fns]

        if check:
            worst = max(rel_diff(s, s_ref) for s in scores.values()) if scores else 0.0
            cells.append(f"{worst:.1e}")
            if not worst <= CHECK_RTOL:
                ok = False
                print(f"CHECK FAILED at {(n, d, c)}: reference {s_ref!r}, torch_logme {scores}",
                      file=sys.stderr)
        cells.append(" / ".join(runs))
        print("| " + " | ".join(cells) + " |", flush=True)
        fig: dict = {"n": n, "d": d, "c": c, "reference_s": t_ref, "reference": REF_NAME,
                     "runs": {name: timed[name][2] for name in fns}}
        for dev in devices:
            fig[f"{dev}_s"] = timed[dev][0]
            fig[f"reference_over_{dev}"] = t_ref / timed[dev][0]
            fig["torch_s"], fig["reference_over_torch"] = timed[dev][0], t_ref / timed[dev][0]
        fig["max_rel_diff"] = max((rel_diff(s, s_ref) for s in scores.values()), default=None)
        record(json_path, "table", {"rows": {f"{n}x{d}x{c}": fig}})
    return ok


def chunked_gram_eigh(f: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor of the job: float64 Gram F^T F [D, D] of float32 rows, then eigh.

    Rows are converted to float64 one chunk at a time, so no float64 copy of F
    is ever held (the same memory discipline logme must keep).
    """
    d = f.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=f.device)
    for rows in f.split(chunk_rows):
        rows64 = rows.to(torch.float64)
        gram.addmm_(rows64.T, rows64)
    return torch.linalg.eigh(gram)


def device_time(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median wall time of ``fn`` in seconds, synchronising around each run on CUDA."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_reference(shape: tuple[int, int, int], f_np: np.ndarray, y_np: np.ndarray,
                   budget_s: float) -> dict:
    """Time the numpy reference at ``shape``, at full size only when that fits ``budget_s``.

    It first runs once on a problem of the same D and C with N / 5 rows
    (made by make_problem: every class present). Its time scales at most
    linearly with N (the Gram product, the left singular vectors and the
    per-class passes over them all grow with N; the D x D SVD does not), so
    that time x 5 bounds the full run from above. The full run is timed
    only when that bound fits the budget; otherwise the bound stands in,
    labelled as an estimate, never as a measurement.

    Returns:
        reference_subsample_rows / _s (measured), reference_full_estimate_s
        (the bound), reference_full_s (measured, or None) and, when
        measured, reference_score.
    """
    n, d, c = shape
    n_sub = max(n // 5, 2 * c)
    f_sub, y_sub = make_problem(n_sub, d, c, seed=SEED + 1)
    t0 = time.perf_counter()
    RefLogME().fit(f_sub, y_sub)
    t_sub = time.perf_counter() - t0
    del f_sub, y_sub
    out = {"reference": REF_NAME, "reference_subsample_rows": n_sub, "reference_subsample_s": t_sub,
           "reference_full_estimate_s": t_sub * n / n_sub, "reference_full_s": None,
           "reference_budget_s": budget_s}
    if out["reference_full_estimate_s"] <= budget_s:
        t0 = time.perf_counter()
        out["reference_score"] = RefLogME().fit(f_np, y_np)
        out["reference_full_s"] = time.perf_counter() - t0
    return out


def run_floor(device: str, shape: tuple[int, int, int], repeat: int, reference_budget_s: float,
              check: bool, json_path: str | None = None) -> tuple[bool, bool]:
    """Print the floor section at ``shape`` on ``device``; returns (targets met, check passed).

    float32 features on the device, float64 compute: logme end to end
    against the chunked Gram product plus eigh, the extra peak memory of
    logme (CUDA only), and the reference on the CPU cores. The targets are
    the GPU's at (50000, 2048, 1000); elsewhere they are printed, not judged.
    Every figure goes to ``table.floor`` as soon as it is measured.
    """
    n, d, c = shape
    # The problem of the rest of the table (make_problem): the reference
    # gets the very numbers the device gets, as float64.
    f_np, y_np = make_problem(n, d, c)
    feats = torch.from_numpy(f_np).to(device, torch.float32)
    labels = torch.from_numpy(y_np).to(device)
    if device == "cuda":
        torch.cuda.synchronize()

    # The closures here run only before `del feats, labels` below, which frees
    # the device memory (ruff resolves their names after the del: F821).
    def end_to_end() -> float:
        return logme(feats, labels, dtype=torch.float64).item()  # noqa: F821

    # Warm up both (cuBLAS/cuSOLVER handles, workspaces, allocator pools).
    score = end_to_end()
    chunked_gram_eigh(feats)
    # At least 5 runs on the GPU, where a run takes a fraction of a second.
    repeat = max(repeat, 5) if device == "cuda" else max(repeat, 1)
    t_floor = device_time(lambda: chunked_gram_eigh(feats), device, repeat)  # noqa: F821
    t_logme = device_time(end_to_end, device, repeat)
    extra_gb = None
    if device == "cuda":
        # Extra peak memory: what logme allocates beyond what is already held
        # (the features and labels), measured from a clean cache.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        end_to_end()
        torch.cuda.synchronize()
        extra_gb = (torch.cuda.max_memory_allocated() - held) / 1e9
    ratio = t_logme / t_floor
    features_gb = feats.numel() * feats.element_size() / 1e9
    fig = {"device": device, "n": n, "d": d, "c": c, "repeat": repeat, "features_gb": features_gb,
           "gram_eigh_ms": t_floor * 1e3, "logme_ms": t_logme * 1e3, "ratio_logme_over_floor": ratio,
           "extra_peak_gb": extra_gb, "logme_score": score, "cpu_cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    record(json_path, "table", {"floor": fig})
    del feats, labels
    if device == "cuda":
        torch.cuda.empty_cache()

    ref = time_reference(shape, f_np, y_np, reference_budget_s)
    ref["reference_over_logme_estimate"] = ref["reference_full_estimate_s"] / t_logme
    ref["reference_over_logme"] = None
    ok = True
    if ref["reference_full_s"] is not None:
        ref["reference_over_logme"] = ref["reference_full_s"] / t_logme
        ref["reference_rel_diff"] = rel_diff(score, ref["reference_score"])
        ok = not check or ref["reference_rel_diff"] <= CHECK_RTOL
        if not ok:
            print(f"CHECK FAILED at {shape}: reference {ref['reference_score']!r}, torch_logme {score!r}",
                  file=sys.stderr)
    record(json_path, "table", {"floor": ref})

    print()
    print(f"{device.upper()}: N, D, C = {n}, {d}, {c}; float32 features on the {device.upper()} "
          f"({features_gb:.2f} GB), float64 compute, median of {repeat}")
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| Gram (float64, chunked) + eigh alone | {t_floor * 1e3:.1f} ms | |")
    print(f"| logme end to end | {t_logme * 1e3:.1f} ms | |")
    print(f"| ratio logme / (Gram + eigh) | {ratio:.2f} | <= 1.1 |")
    memory = "n/a (CPU)" if extra_gb is None else f"{extra_gb:.3f} GB"
    print(f"| extra peak memory of logme | {memory} | < 1.5 GB |")
    where = f"the CPU ({os.cpu_count()} logical cores)"
    print(f"| {REF_NAME} on {where}, N = {ref['reference_subsample_rows']} rows "
          f"(measured) | {fmt_time(ref['reference_subsample_s'])} | |")
    if ref["reference_full_s"] is not None:
        print(f"| {REF_NAME}, full size (measured) | {fmt_time(ref['reference_full_s'])} | |")
        print(f"| ratio reference / logme (measured) | {ref['reference_over_logme']:.3g}x | |")
    else:
        print(f"| {REF_NAME}, full size: ESTIMATE, not measured (N/{ref['reference_subsample_rows']} x the "
              f"subsample time, an upper bound; over the {reference_budget_s:g} s budget) "
              f"| {fmt_time(ref['reference_full_estimate_s'])} | |")
        print(f"| ratio reference / logme: ESTIMATE from that bound, not measured "
              f"| {ref['reference_over_logme_estimate']:.3g}x | |")
    met = ratio <= 1.1 and extra_gb is not None and extra_gb < 1.5
    return met, ok


def parse_shape(text: str) -> tuple[int, int, int]:
    """"N,D,C" -> (N, D, C)."""
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N,D,C (three positive ints), got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["small", "all", "smoke"], default="small",
                        help="small: (10000, 768, 10) only; all: also (20000, 1024, 100|1000); "
                             "smoke: tiny shapes, seconds in all")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where torch_logme runs (the reference always runs on the CPU)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="stop repeating a cell once this many seconds were spent on it "
                             "(the reference at C=1000 is then timed once)")
    parser.add_argument("--check", action="store_true",
                        help=f"fail unless every torch_logme score equals the reference to {CHECK_RTOL:g} relative")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="merge every figure into the table section of this JSON file")
    parser.add_argument("--floor-device", choices=["cpu", "cuda"], default=None,
                        help="device of the floor section (default: cuda when it is timed, else none)")
    parser.add_argument("--floor-shape", type=parse_shape, default=GPU_SHAPE, metavar="N,D,C",
                        help="shape of the floor section (default: %(default)s)")
    parser.add_argument("--reference-budget", type=float, default=120.0, metavar="S",
                        help="time the reference at the floor shape in full only when its estimate "
                             "is below S seconds (default 120); else report the estimate, labelled")
    args = parser.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("CUDA is not available: timing the CPU only.", file=sys.stderr)
        devices = ["cpu"]
    shapes = {"small": SHAPES[:1], "all": SHAPES, "smoke": SMOKE_SHAPES}[args.shapes]
    floor_device = args.floor_device or ("cuda" if "cuda" in devices else None)
    if floor_device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: no floor section.", file=sys.stderr)
        floor_device = None

    print(machine_header())
    print()
    print(f"Median of up to {args.repeat} runs per cell, implementations interleaved round by round "
          f"(fewer runs once a cell has taken {args.budget:g} s; see the runs column). torch_logme "
          "computes in float64; CPU inputs are float64, CUDA inputs are float32 features already on the GPU.")
    print()
    record(args.json, "table", {"header": machine_header(), "repeat": args.repeat, "budget_s": args.budget,
                                "devices": devices})
    ok = run_table(shapes, devices, args.repeat, args.budget, args.check, args.json)
    if floor_device is not None:
        met, floor_ok = run_floor(floor_device, args.floor_shape, args.repeat, args.reference_budget,
                                  args.check, args.json)
        ok = ok and floor_ok
        print()
        if floor_device == "cuda" and tuple(args.floor_shape) == GPU_SHAPE:
            print("GPU targets met." if met else "GPU targets NOT met.")
        else:
            print("(targets apply to CUDA at the GPU shape only: not judged here)")
    print()
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
          if hasattr(os, "getloadavg") else "")
    if args.check:
        print("check: all scores within tolerance" if ok else "check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
