"""What ranking a model costs over its forward passes alone, and its memory at 1x and 10x the samples.

Usage::

    python benchmarks/model_ranking_table.py [--samples 600] [--size 64] [--batch 100] [--repeat 3]
                                             [--memory-samples 200] [--memory-size 32] [--scale 10]
                                             [--device cpu|cuda] [--json PATH]
    python benchmarks/model_ranking_table.py --samples 2000      # the issue's shape (minutes on 2 cores)

A ResNet-18-sized network built here from torch.nn (no torchvision: the
BasicBlock layout, 11.7M parameters) runs over ``--samples`` random
``--size`` x ``--size`` images, in eval mode under torch.inference_mode:

- "forward passes alone": the loop a user would write, ``model(x)`` per batch;
- ``rank_models``: the same model and batches, one layer (the classifier's
  input, [B, 512]) and LogME, with no progress bar.

Both read the same batches, made once before timing (so making the data is
in neither), and run interleaved, round by round, ``--repeat`` times: the
table gives the medians and their ratio (target < 1.10).

On a machine shared with other work, pass ``--threads 1``: with two
threads and more runnable processes than cores, LAPACK's many short
parallel regions in LogME's one ``eigh`` (512 x 512 here, 0.1 s alone)
were seen to wait seconds at their barriers, which the forward passes
alone never call.

The default run keeps to about two minutes on a 2-core machine: 600 images
for the timing (``--samples 2000`` is the issue's shape, 20-30 s a pass
there) and smaller images for the memory runs.

Then the memory: ``rank_models`` at 1x (``--memory-samples`` images of
``--memory-size`` pixels) and ``--scale`` x the samples (the same batches
read again and again, so the data's own memory does not grow),
reporting its peak memory (on the CPU the process's peak resident set size
above the start, on CUDA ``max_memory_allocated`` above the start), with
the forward passes alone, measured the same way, beside it. A streamed
score keeps a fixed set of sums, so the peak must not grow with N.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from table import machine_header  # noqa: E402

from torch_logme import rank_models  # noqa: E402
from torch_logme.model_result import PeakMemory, rss_kib  # noqa: E402

from _results import record  # noqa: E402


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and the identity (or a 1x1 projection) added."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18's layout: stem, four stages of two BasicBlocks (64..512 channels), pooling, classifier."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        stages: List[nn.Module] = []
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Batches:
    """``times`` passes over a fixed list of batches: N grows, the data's memory does not."""

    def __init__(self, batches: List[Tuple[torch.Tensor, torch.Tensor]], times: int = 1) -> None:
        self.batches, self.times = batches, times

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.times):
            yield from self.batches

    def __len__(self) -> int:
        return len(self.batches) * self.times


def make_batches(samples: int, size: int, batch: int, device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, samples, batch):
        b = min(batch, samples - start)
        y = torch.randint(0, 10, (b,), generator=gen)
        x = torch.randn(b, 3, size, size, generator=gen)
        x[:, 0] += 0.2 * y[:, None, None].float()  # some signal, so LogME's fixed point does real work
        out.append((x.to(device), y.to(device)))
    return out


def forward_alone(model: nn.Module, data: Batches) -> None:
    """The evaluation loop a user writes: eval mode, inference mode, one forward pass per batch."""
    model.eval()
    with torch.inference_mode():
        for x, _ in data:
            model(x)
    if x.is_cuda:
        torch.cuda.synchronize()


def rank(model: nn.Module, data: Batches) -> Any:
    return rank_models({"resnet18": model}, data, ("logme",), progress=False)


def rank_into(holder: Dict[str, Any], model: nn.Module, data: Batches) -> None:
    holder["ranking"] = rank(model, data)


def timed(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def peak_of(fn: Callable[[], Any], device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """Peak memory of ``fn()``: above the start, measured as rank_models measures it, and in all.

    In all: the process's peak resident set size (CPU), or the peak of
    allocated CUDA memory, model and data included.
    """
    meter = PeakMemory(device)
    meter.start()
    fn()
    if device.type == "cuda":
        whole: Optional[int] = torch.cuda.max_memory_allocated(device)
    else:
        kib = rss_kib("VmHWM")
        whole = None if kib is None else kib * 1024
    return meter.peak(device)[0], whole


def mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-samples", type=int, default=200, help="the memory runs' 1x")
    parser.add_argument("--memory-size", type=int, default=32, help="the memory runs' image size")
    parser.add_argument("--scale", type=int, default=10, help="the memory run's multiple of the samples (0: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's); 1 on a machine shared with other work")
    parser.add_argument("--json", default=None, help="merge the figures into the model_ranking section of PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ResNet18().to(device)
    batches = make_batches(args.samples, args.size, args.batch, device)
    data = Batches(batches)
    forward_alone(model, Batches(batches[:2]))  # warm-up: first-call allocations and kernels are not timed
    rank(model, Batches(batches[:2]))

    times: Dict[str, List[float]] = {"forward": [], "rank": [], "forward_cpu": [], "rank_cpu": []}
    score = float("nan")
    for _ in range(args.repeat):  # interleaved: a burst of other work slows both alike
        wall, cpu, _ = timed(partial(forward_alone, model, data))
        times["forward"].append(wall)
        times["forward_cpu"].append(cpu)
        wall, cpu, ranking = timed(partial(rank, model, data))
        times["rank"].append(wall)
        times["rank_cpu"].append(cpu)
        score = ranking[0].scores["logme"]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, cpu_ratio = med["rank"] / med["forward"], med["rank_cpu"] / med["forward_cpu"]

    print("## Ranking a model against its forward passes alone\n")
    print(machine_header())
    print(f"- model: ResNet-18 layout built from torch.nn ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters), {args.samples} random {args.size}x{args.size} images, batch {args.batch}, {device}; "
          "rank_models: one layer (fc's input, D = 512), LogME")
    print("- medians of interleaved runs; CPU time is this process's (time.process_time), less disturbed by "
          "other work than wall time when torch runs one thread")
    print()
    print("| | forward passes alone | rank_models | ratio (target < 1.10) |")
    print("|---|---|---|---|")
    print(f"| wall time | {med['forward']:.2f} s | {med['rank']:.2f} s | {ratio:.3f} |")
    print(f"| CPU time | {med['forward_cpu']:.2f} s | {med['rank_cpu']:.2f} s | {cpu_ratio:.3f} |")
    print(f"\nLogME of the layer: {score:.6g}; {args.repeat} runs each; wall times of the runs: forward "
          f"{', '.join(f'{t:.2f}' for t in times['forward'])} s, rank_models "
          f"{', '.join(f'{t:.2f}' for t in times['rank'])} s")
    figures: Dict[str, Any] = {"forward_s": med["forward"], "rank_s": med["rank"], "ratio": ratio,
                               "forward_cpu_s": med["forward_cpu"], "rank_cpu_s": med["rank_cpu"],
                               "cpu_ratio": cpu_ratio, "runs": times, "logme": score, "samples": args.samples,
                               "size": args.size, "batch": args.batch, "device": str(device),
                               "threads": torch.get_num_threads()}

    if args.scale > 0:
        batches = make_batches(args.memory_samples, args.memory_size, args.batch, device)
        print()
        print(f"Peak memory above the start ({PeakMemory.HOW[device.type]}), {args.memory_size}x{args.memory_size} "
              f"images, the same {len(batches)} batches read {args.scale} times for {args.scale}x:\n")
        print("| samples | forward passes alone: above the start / in all | rank_models: above the start / in all "
              "| rank_models, as it reports it |")
        print("|---|---|---|---|")
        memory = {}
        for times_over in (1, args.scale):
            scaled = Batches(batches, times_over)
            fwd, fwd_all = peak_of(partial(forward_alone, model, scaled), device)
            holder: Dict[str, Any] = {}
            ranked, ranked_all = peak_of(partial(rank_into, holder, model, scaled), device)
            reported = holder["ranking"][0].peak_memory
            n = args.memory_samples * times_over
            print(f"| {n} | {mib(fwd)} / {mib(fwd_all)} | {mib(ranked)} / {mib(ranked_all)} | {mib(reported)} |")
            memory[str(n)] = {"forward_bytes": fwd, "forward_total_bytes": fwd_all, "rank_bytes": ranked,
                              "rank_total_bytes": ranked_all, "reported_bytes": reported}
        figures["memory"] = {"size": args.memory_size, "rows": memory}
    if args.json:
        record(args.json, "model_ranking", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
