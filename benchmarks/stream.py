"""Streaming benchmarks: per-batch update cost, and constant memory over N.

    python benchmarks/stream.py                      # CPU, and CUDA when present
    python benchmarks/stream.py --rows 10000000      # the 10M x 1024 run (GPU-sized)
    python benchmarks/stream.py --device cuda --json out.json   # also merge the figures into out.json

Table 1: ``LogMEAccumulator.update`` at B = 256, D = 2048, C = 1000 against
one rank-B update of a float64 Gram matrix alone (``G.addmm_(x.T, x)``), the
floor of an update. ``check_inputs=False`` (with ``num_classes``) is the
sync-free update; the default reads one value back to the host per update.

Table 2: one accumulator fed ``--rows`` rows x 1024 float32 features in
batches of 4096, each size in a fresh process, with its peak memory: the
peak stays flat as N grows tenfold. The batches come from a pool of 8 made
on the device before the clock starts, so the time is the accumulator's
alone. The rate counts the flops of the full product X^T X (2 N D^2) and is
compared with the rate of float64 ``G.addmm_(x.T, x)`` on the same batches
(Table 3), the GEMM that torch runs for that product.

``--json PATH`` merges every figure into the ``stream`` section of PATH.
Runs from a checkout with nothing installed (the op built in place or not).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# Run as `python benchmarks/stream.py` (and so in each fresh child process),
# Python puts benchmarks/ on sys.path, not the checkout: add it, so an
# uninstalled checkout imports.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from torch_logme import LogMEAccumulator  # noqa: E402

from _results import record  # noqa: E402

#: Table 1 sizes: batch, features, classes.
B, D, C = 256, 2048, 1000
#: Table 2 sizes: features, batch, classes, and the pool of distinct batches.
STREAM_D, STREAM_BATCH, STREAM_C, POOL = 1024, 4096, 100, 8


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], device: str, repeat: int) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def update_table(devices: List[str], repeat: int, b: int = B, d: int = D, c: int = C,
                 json_path: Optional[str] = None) -> None:
    """Table 1: the cost of one update against the rank-b Gram update alone."""
    print(f"\n### update cost, B = {b}, D = {d}, C = {c} (median of {repeat})\n")
    print("| device | rank-B Gram update alone | update (checked) | update (check_inputs=False) "
          "| overhead (unchecked) |")
    print("|---|---|---|---|---|")
    for device in devices:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, d, generator=gen, device=device)  # float32, as after a forward pass
        y = torch.randint(0, c, (b,), generator=gen, device=device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)

        def floor(x: torch.Tensor = x, gram: torch.Tensor = gram) -> None:
            xd = x.double()
            gram.addmm_(xd.T, xd)

        checked = LogMEAccumulator(d, c, device=device)
        unchecked = LogMEAccumulator(d, c, device=device, check_inputs=False)
        t_floor = _median_ms(floor, device, repeat)
        t_checked = _median_ms(lambda acc=checked, x=x, y=y: acc.update(x, y), device, repeat)
        t_unchecked = _median_ms(lambda acc=unchecked, x=x, y=y: acc.update(x, y), device, repeat)
        print(f"| {device} | {t_floor:.3f} ms | {t_checked:.3f} ms | {t_unchecked:.3f} ms "
              f"| {t_unchecked - t_floor:+.3f} ms |", flush=True)
        record(json_path, "stream", {"update": {device: {
            "batch": b, "features": d, "classes": c, "repeat": repeat, "gram_update_ms": t_floor,
            "update_checked_ms": t_checked, "update_unchecked_ms": t_unchecked,
            "overhead_unchecked_ms": t_unchecked - t_floor,
        }}})


def gemm_rate(device: str, d: int = STREAM_D, batch: int = STREAM_BATCH, seconds: float = 1.0) -> Dict[str, float]:
    """GFLOP/s of float64 ``G.addmm_(x.T, x)`` for x [batch, d]: the GEMM of the streamed product.

    Repeats the product for about ``seconds`` after a warm-up; the flops are
    2 * batch * d^2 per product.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, d, generator=gen, device=device, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    step = lambda: gram.addmm_(x.T, x)  # noqa: E731
    one = _median_ms(step, device, 3) / 1e3
    count = max(3, int(seconds / max(one, 1e-6)))
    _sync(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"gflops": 2.0 * batch * d * d * count / elapsed / 1e9, "products": count, "seconds": elapsed,
            "batch": batch, "features": d}


def _stream_once(rows: int, device: str, d: int = STREAM_D, batch: int = STREAM_BATCH,
                 classes: int = STREAM_C) -> dict:
    """Feed ``rows`` x d in batches of ``batch``; return times, score and peak memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    pool = []
    for _ in range(min(POOL, -(-rows // batch))):
        y = torch.randint(0, classes, (batch,), generator=gen, device=device)
        x = torch.randn(batch, d, generator=gen, device=device)
        x[:, :4] += y[:, None].float() / classes  # a little signal
        pool.append((x, y))
    # One update and compute first, so library set-up (cuBLAS handles, the
    # eigensolver's workspace) is not timed.
    warm = LogMEAccumulator(d, classes, device=device, check_inputs=False)
    warm.update(*pool[0])
    warm.compute().item()
    del warm
    acc = LogMEAccumulator(d, classes, device=device, check_inputs=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    done, i = 0, 0
    while done < rows:
        x, y = pool[i % len(pool)]
        b = min(batch, rows - done)
        acc.update(x[:b], y[:b])
        done += b
        i += 1
    _sync(device)
    updated = time.perf_counter()
    score = acc.compute().item()
    finished = time.perf_counter()
    out = {"rows": rows, "features": d, "batch": batch, "classes": classes,
           "update_seconds": updated - start, "compute_seconds": finished - updated,
           "seconds": finished - start, "score": score,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
    return out


def memory_table(devices: List[str], rows: int, d: int = STREAM_D, batch: int = STREAM_BATCH,
                 classes: int = STREAM_C, json_path: Optional[str] = None) -> None:
    """Tables 2 and 3: rows / 10 and rows streamed in fresh processes, and the GEMM rate."""
    print(f"\n### constant memory: {d} features, batches of {batch}, fresh process per size\n")
    print("| device | rows | time (updates + compute) | rows/s | GFLOP/s of X^T X | of float64 GEMM "
          "| peak RSS | peak CUDA allocated |")
    print("|---|---|---|---|---|---|---|---|")
    gemm = {}
    for device in devices:
        gemm[device] = gemm_rate(device, d, batch)
        record(json_path, "stream", {"gemm": {device: gemm[device]}})
        for n in (rows // 10, rows):
            cmd = [sys.executable, __file__, "--child", str(n), "--child-device", device,
                   "--stream-features", str(d), "--stream-batch", str(batch), "--stream-classes", str(classes)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            res["rows_per_s"] = n / res["update_seconds"]
            res["stream_gflops"] = 2.0 * n * d * d / res["update_seconds"] / 1e9
            res["fraction_of_gemm"] = res["stream_gflops"] / gemm[device]["gflops"]
            record(json_path, "stream", {"memory": {device: {str(n): res}}})
            cuda = "-" if res["peak_cuda_mib"] is None else f"{res['peak_cuda_mib']:.0f} MiB"
            print(f"| {device} | {n:,} | {res['update_seconds']:.2f} s + {res['compute_seconds']:.2f} s "
                  f"| {res['rows_per_s']:,.0f} | {res['stream_gflops']:.1f} | {res['fraction_of_gemm']:.0%} "
                  f"| {res['peak_rss_mib']:.0f} MiB | {cuda} |", flush=True)
    print(f"\n### float64 GEMM alone: `G.addmm_(x.T, x)`, x [{batch}, {d}] float64\n")
    print("| device | GFLOP/s | products timed |")
    print("|---|---|---|")
    for device, g in gemm.items():
        print(f"| {device} | {g['gflops']:.1f} | {g['products']} |")


def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the large streaming run (default 1M)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--batch", type=int, default=B, help=f"table 1 batch size (default {B})")
    p.add_argument("--features", type=int, default=D, help=f"table 1 features (default {D})")
    p.add_argument("--classes", type=int, default=C, help=f"table 1 classes (default {C})")
    p.add_argument("--stream-features", type=int, default=STREAM_D, help=f"table 2 features (default {STREAM_D})")
    p.add_argument("--stream-batch", type=int, default=STREAM_BATCH, help=f"table 2 batch (default {STREAM_BATCH})")
    p.add_argument("--stream-classes", type=int, default=STREAM_C, help=f"table 2 classes (default {STREAM_C})")
    p.add_argument("--json", default=None, metavar="PATH", help="merge the figures into this JSON file")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-device", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_stream_once(args.child, args.child_device, args.stream_features, args.stream_batch,
                                      args.stream_classes)))
        return
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    elif args.device == "cuda":
        print("CUDA is not available: nothing to time.", file=sys.stderr)
        sys.exit(1)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    machine = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), GPU: {gpu}, "
               f"load average {os.getloadavg()[0]:.2f}")
    print(machine)
    record(args.json, "stream", {"header": machine, "devices": devices})
    update_table(devices, args.repeat, args.batch, args.features, args.classes, args.json)
    memory_table(devices, args.rows, args.stream_features, args.stream_batch, args.stream_classes, args.json)


if __name__ == "__main__":
    main()
