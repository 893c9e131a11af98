"""What the precision machinery costs: the default LogME route against the fast route alone.

The default ``logme`` runs the fast route (plain sums, eigh, fixed point),
checks a round-off bound after the fixed point and, when the bound is not
met, sums about the mean and runs the precise route (docs/design.md,
section 4). This script times, side by side in one
run, on the same features:

* well-conditioned features (Gaussian, ReLU): ``logme`` against the bare
  fast route (sums, eigh, fixed point, nothing else): the overhead of
  the checks, which should be small;
* features that need the precise route (a large offset, columns of very
  different scales): ``logme`` against the bare fast route, with each
  one's relative error against ``solver="svd"`` (checked before timing).

``--baseline DIR`` also times ``logme`` from another checkout of this
repository (built in place), in a subprocess per repeat, interleaved with
this one: an A/B of the whole function across versions.

    python benchmarks/precision.py --repeat 5
    python benchmarks/precision.py --repeat 5 --baseline ../torch_logme_main
    python benchmarks/precision.py --clock process --threads 1   # CPU time: steadier on a shared machine
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, nothing installed

import torch  # noqa: E402

from torch_logme import logme  # noqa: E402
from torch_logme._options import logme_options  # noqa: E402
from torch_logme.evidence import fixed_point  # noqa: E402
from torch_logme.spectrum import primal  # noqa: E402
from torch_logme.sums import compute_statistics  # noqa: E402

SHAPES = [(10000, 768, 10), (20000, 1024, 100)]

_BASELINE = """
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
from torch_logme import logme
n, d, c, kind, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
clock, threads = getattr(time, sys.argv[8]), int(sys.argv[9])
if threads:
    torch.set_num_threads(threads)
exec(sys.argv[7])
f, y = make(n, d, c, kind, seed)
logme(f, y)
t = clock(); logme(f, y); print(json.dumps(clock() - t))
"""

_MAKE = '''
def make(n, d, c, kind, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    f = torch.randn(n, d, generator=g) + 0.5 * torch.randn(c, d, generator=g)[y]
    if kind == "relu":
        f = torch.relu(f)
    elif kind == "offset":
        f = f.double() + 1e7
    elif kind == "graded":
        f = f.double() * torch.logspace(-4, 4, d, dtype=torch.float64)
    return f, y
'''
exec(_MAKE)


def fast_route(f: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """The bare fast route: raw sums, eigh, fixed point; no shift, no bound, no fallback."""
    stats = compute_statistics(f, y, c, True, torch.float64, about_mean=False)
    spec = primal(stats, with_basis=False)
    result = fixed_point(spec, logme_options())
    return result.evidence.mean()


CLOCK = "perf_counter"


def timed(fn) -> float:
    clock = getattr(time, CLOCK)
    start = clock()
    fn()
    return clock() - start


def baseline_time(directory: str, n: int, d: int, c: int, kind: str, seed: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE, directory, str(n), str(d), str(c), kind, str(seed), _MAKE,
         CLOCK, str(torch.get_num_threads())],
        check=True, capture_output=True, text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _cpu() -> str:
    try:
        from _results import cpu_model  # benchmarks/ is on sys.path when run as a script
        return cpu_model()
    except ImportError:
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="another checkout of torch_logme, built in place")
    parser.add_argument("--shapes", default="all", choices=["all", "small"])
    parser.add_argument("--kinds", default="gauss,relu,offset,graded")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="wall time, or this process's CPU time (steadier when other work shares the cores)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = "process_time" if args.clock == "process" else "perf_counter"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes == "all" else [(2000, 64, 10)]
    print(f"# {_cpu()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"clock: {args.clock}, medians of {args.repeat}")
    header = "| kind | (N, D, C) | logme ms | fast route ms | ratio | rel. err logme | rel. err fast |"
    if args.baseline:
        header += " baseline logme ms | ratio to baseline |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind in args.kinds.split(","):
        for n, d, c in shapes:
            f, y = make(n, d, c, kind, n + d)  # noqa: F821 (defined by exec above)
            exact = float(logme(f, y, solver="svd"))
            ours, bare = float(logme(f, y)), float(fast_route(f, y, c))
            err_ours = abs(ours - exact) / abs(exact)
            err_bare = abs(bare - exact) / abs(exact) if bare == bare else float("nan")
            mine, fast, base = [], [], []
            for _ in range(args.repeat):  # interleaved, so load changes hit all alike
                mine.append(timed(lambda f=f, y=y: logme(f, y)))
                fast.append(timed(lambda f=f, y=y, c=c: fast_route(f, y, c)))
                if args.baseline:
                    base.append(baseline_time(args.baseline, n, d, c, kind, n + d))
            m, b = statistics.median(mine), statistics.median(fast)
            row = (f"| {kind} | ({n}, {d}, {c}) | {1e3 * m:.1f} | {1e3 * b:.1f} | {m / b:.2f} | "
                   f"{err_ours:.1e} | {err_bare:.1e} |")
            if args.baseline:
                row += f" {1e3 * statistics.median(base):.1f} | {m / statistics.median(base):.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
