"""Side-by-side timing table of torch_logme against the numpy reference.

Usage::

    python benchmarks/table.py [--shapes small|all] [--repeat N] [--device cpu|cuda|all]
                               [--budget SECONDS] [--check]

Prints a Markdown table (median of ``--repeat`` runs per cell) headed by a
description of the machine. When CUDA is available and selected, a second
section compares end-to-end ``logme`` at (50000, 2048, 1000) with the floor of
the job, the float64 Gram product plus ``eigh``, and reports the extra peak
GPU memory. Runs on CPU-only machines; CUDA parts are skipped there.

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

#: (N, D, C) of the CPU/CUDA comparison; "small" is the first one only.
SHAPES: list[tuple[int, int, int]] = [(10_000, 768, 10), (20_000, 1024, 100), (20_000, 1024, 1000)]
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


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


def time_interleaved(fns: dict[str, Callable[[], float]], repeat: int,
                     budget_s: float) -> dict[str, tuple[float, float, int]]:
    """Time each of ``fns`` up to ``repeat`` times, one round of all at a time.

    Returns {name: (median seconds, last result, runs)}. Interleaving the
    implementations round by round means a burst of other work on a shared
    machine slows all of them alike instead of one whole cell. A function
    stops repeating once ``budget_s`` seconds were spent on it, so the slow
    reference (tens of seconds per call at C = 1000) is timed once while the
    fast cells get the full ``repeat``. Each function must block until its
    work is done (synchronize for CUDA) and return the score.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, float] = {}
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            if times[name] and sum(times[name]) >= budget_s:
                continue
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), results[name], len(ts)) for name, ts in times.items()}


def fmt_time(seconds: float) -> str:
    """Milliseconds below one second, seconds above."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b|, guarded against b == 0."""
    return abs(a - b) / max(abs(b), 1e-300)


def run_table(shapes: list[tuple[int, int, int]], devices: list[str], repeat: int,
              budget_s: float, check: bool) -> bool:
    """Print the comparison table; returns False when --check found a mismatch."""
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
        fns: dict[str, Callable[[], float]] = {"ref": lambda: RefLogME().fit(f_np, y_np)}
        if "cpu" in devices:
            f_cpu, y_cpu = torch.from_numpy(f_np), torch.from_numpy(y_np)
            fns["cpu"] = lambda: logme(f_cpu, y_cpu, dtype=torch.float64).item()
        if "cuda" in devices:
            # The features live on the GPU as float32 before the clock starts
            # (the scoring-after-forward-pass case); compute is float64.
            f_gpu = torch.from_numpy(f_np).to("cuda", torch.float32)
            y_gpu = torch.from_numpy(y_np).to("cuda")

            def run_cuda() -> float:
                out = logme(f_gpu, y_gpu, dtype=torch.float64)
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


def cuda_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in seconds, synchronising around each run."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_gpu_floor(repeat: int) -> bool:
    """Print the GPU section at GPU_SHAPE; returns whether both targets were met."""
    n, d, c = GPU_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    labels = (torch.arange(n, device="cuda") % c)[torch.randperm(n, device="cuda", generator=gen)]
    means = 0.5 * torch.randn(c, d, device="cuda", generator=gen)
    feats = torch.randn(n, d, device="cuda", generator=gen).add_(means[labels])
    del means
    torch.cuda.synchronize()

    def end_to_end() -> None:
        logme(feats, labels, dtype=torch.float64).item()

    # Warm up both (cuBLAS/cuSOLVER handles, workspaces, allocator pools).
    end_to_end()
    chunked_gram_eigh(feats)
    repeat = max(repeat, 5)
    t_floor = cuda_time(lambda: chunked_gram_eigh(feats), repeat)
    t_logme = cuda_time(end_to_end, repeat)

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
    print()
    print(f"GPU: N, D, C = {n}, {d}, {c}; float32 features on the GPU "
          f"({feats.numel() * feats.element_size() / 1e9:.2f} GB), float64 compute, median of {repeat}")
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| Gram (float64, chunked) + eigh alone | {t_floor * 1e3:.1f} ms | |")
    print(f"| logme end to end | {t_logme * 1e3:.1f} ms | |")
    print(f"| ratio logme / (Gram + eigh) | {ratio:.2f} | <= 1.1 |")
    print(f"| extra peak memory of logme | {extra_gb:.3f} GB | < 1.5 GB |")
    return ratio <= 1.1 and extra_gb < 1.5


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=["small", "all"], default="small",
                        help="small: (10000, 768, 10) only; all: also (20000, 1024, 100|1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where torch_logme runs (the reference always runs on the CPU)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="stop repeating a cell once this many seconds were spent on it "
                             "(the reference at C=1000 is then timed once)")
    parser.add_argument("--check", action="store_true",
                        help=f"fail unless every torch_logme score equals the reference to {CHECK_RTOL:g} relative")
    args = parser.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("CUDA is not available: timing the CPU only.", file=sys.stderr)
        devices = ["cpu"]
    shapes = SHAPES[:1] if args.shapes == "small" else SHAPES

    print(machine_header())
    print()
    print(f"Median of up to {args.repeat} runs per cell, implementations interleaved round by round "
          f"(fewer runs once a cell has taken {args.budget:g} s; see the runs column). torch_logme "
          "computes in float64; CPU inputs are float64, CUDA inputs are float32 features already on the GPU.")
    print()
    ok = run_table(shapes, devices, args.repeat, args.budget, args.check)
    if "cuda" in devices:
        met = run_gpu_floor(args.repeat)
        print()
        print("GPU targets met." if met else "GPU targets NOT met.")
    print()
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
          if hasattr(os, "getloadavg") else "")
    if args.check:
        print("check: all scores within tolerance" if ok else "check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
