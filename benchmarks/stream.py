"""Streaming benchmarks: per-batch update cost, and constant memory over N.

    python benchmarks/stream.py                      # CPU, and CUDA when present
    python benchmarks/stream.py --rows 10000000      # the 10M x 1024 run (GPU-sized)

Table 1: ``LogMEAccumulator.update`` at B = 256, D = 2048 against one rank-B
update of a float64 Gram matrix alone (``G.addmm_(x.T, x)``), the floor of
an update. ``check_inputs=False`` (with ``num_classes``) is the sync-free
update; the default reads one value back to the host per update.

Table 2: one accumulator fed ``--rows`` rows x 1024 features in batches of
4096 (generated on the fly, never stored), each size in a fresh process, with
its peak memory: the peak stays flat as N grows tenfold.
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

import torch

from torch_logme import LogMEAccumulator

B, D, C = 256, 2048, 1000


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, repeat: int) -> float:
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


def update_table(devices: list[str], repeat: int) -> None:
    print(f"\n### update cost, B = {B}, D = {D}, C = {C} (median of {repeat})\n")
    print("| device | rank-B Gram update alone | update (checked) | update (check_inputs=False) | overhead (unchecked) |")
    print("|---|---|---|---|---|")
    for device in devices:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, D, generator=gen, device=device)  # float32, as after a forward pass
        y = torch.randint(0, C, (B,), generator=gen, device=device)
        gram = torch.zeros(D, D, dtype=torch.float64, device=device)

        def floor():
            xd = x.double()
            gram.addmm_(xd.T, xd)

        checked = LogMEAccumulator(D, C, device=device)
        unchecked = LogMEAccumulator(D, C, device=device, check_inputs=False)
        t_floor = _median_ms(floor, device, repeat)
        t_checked = _median_ms(lambda: checked.update(x, y), device, repeat)
        t_unchecked = _median_ms(lambda: unchecked.update(x, y), device, repeat)
        print(f"| {device} | {t_floor:.3f} ms | {t_checked:.3f} ms | {t_unchecked:.3f} ms "
              f"| {t_unchecked - t_floor:+.3f} ms |")


def _stream_once(rows: int, device: str) -> dict:
    """Feed ``rows`` x 1024 in batches of 4096; return time, score and peak memory."""
    d, batch, classes = 1024, 4096, 100
    gen = torch.Generator(device=device).manual_seed(0)
    acc = LogMEAccumulator(d, classes, device=device, check_inputs=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = 0
    while done < rows:
        b = min(batch, rows - done)
        y = torch.randint(0, classes, (b,), generator=gen, device=device)
        x = torch.randn(b, d, generator=gen, device=device)
        x[:, :4] += y[:, None].float() / classes  # a little signal
        acc.update(x, y)
        done += b
    score = acc.compute().item()
    seconds = time.perf_counter() - start
    out = {"rows": rows, "seconds": seconds, "score": score,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory_table(devices: list[str], rows: int) -> None:
    print(f"\n### constant memory: 1024 features, batches of 4096, fresh process per size\n")
    print("| device | rows | time | rows/s | peak RSS | peak CUDA allocated |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        for n in (rows // 10, rows):
            cmd = [sys.executable, __file__, "--child", str(n), "--child-device", device]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            cuda = f"{res['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in res else "-"
            print(f"| {device} | {n:,} | {res['seconds']:.1f} s | {n / res['seconds']:,.0f} "
                  f"| {res['peak_rss_mib']:.0f} MiB | {cuda} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the large streaming run (default 1M)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-device", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(_stream_once(args.child, args.child_device)))
        return
    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "all":
        devices.insert(0, "cpu")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), GPU: {gpu}, "
          f"load average {os.getloadavg()[0]:.2f}")
    update_table(devices, args.repeat)
    memory_table(devices, args.rows)


if __name__ == "__main__":
    main()
