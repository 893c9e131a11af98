"""Timing table of the other scores (LEEP, NCE, H-scores, TransRate, GBC, SFDA, NCTI, NLEEP, ETran, kNN,
PARC) against their numpy references.

Usage::

    python benchmarks/scores_table.py [--repeat N] [--device cpu|cuda|all] [--threads N]
                                      [--budget SECONDS] [--scores NAME ...] [--check]

Prints a Markdown table (median of ``--repeat`` runs per cell, implementations
interleaved round by round) headed by a description of the machine. The
references in ``torch_logme.reference`` are plain numpy written from the
papers, with loops over classes (and class pairs for GBC), as the published
implementations are. CUDA columns appear when CUDA is available and
selected; the features then sit on the GPU as float32 and the scores are
computed in float64, timed up to ``torch.cuda.synchronize()``.

The problem setup (``cases_of``, ``make_case``) is shared with
``benchmarks/test_bench_scores.py``. NLEEP has cases of its own: its EM
costs K N d^2 per iteration (K = 5 C components, d the PCA dimension), so
the numpy reference at the other feature cases' sizes would take hours; kNN
and PARC, whose work (and whose references' memory) is N x N, too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import fmt_time, machine_header, make_problem, rel_diff, time_interleaved  # noqa: E402

import torch_logme  # noqa: E402
from torch_logme import reference  # noqa: E402

#: Feature scores: (N, D, C). The first is the quick shape.
FEATURE_CASES: List[Tuple[int, int, int]] = [(10_000, 768, 10), (20_000, 1024, 100)]
#: LEEP and NCE: (N, Cs source classes, Ct target classes).
PREDICTION_CASES: List[Tuple[int, int, int]] = [(20_000, 1000, 100)]
#: NLEEP: (N, D, C); PCA keeps d = 44 of D = 64 here, and the mixture has 5 C = 25 components.
NLEEP_CASES: List[Tuple[int, int, int]] = [(2_000, 64, 5)]
#: kNN and PARC, whose work is N x N (and whose references hold N x N matrices): (N, D, C).
PAIRWISE_CASES: List[Tuple[int, int, int]] = [(2_000, 256, 10), (5_000, 768, 10)]
FEATURE_SCORES = ("h_score", "regularized_h_score", "transrate", "gbc", "sfda", "ncti", "nleep", "etran")
PREDICTION_SCORES = ("leep", "nce")
PAIRWISE_SCORES = ("knn", "parc")
ALL_SCORES = PREDICTION_SCORES + FEATURE_SCORES + PAIRWISE_SCORES
CHECK_RTOL = 1e-9


def make_predictions(n: int, cs: int, ct: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Source-class probabilities [N, Cs] (float64, rounded through float32) and target labels [N].

    Each target class prefers a few source classes, so the joint has structure.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % ct).astype(np.int64)
    favourite = rng.integers(0, cs, ct)
    logits = rng.standard_normal((n, cs), dtype=np.float32)
    logits[np.arange(n), favourite[labels]] += np.float32(4.0)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return probs.astype(np.float64), labels


def cases_of(score: str) -> List[Tuple[int, int, int]]:
    """The shapes a score is timed at."""
    if score in PREDICTION_SCORES:
        return PREDICTION_CASES
    if score in PAIRWISE_SCORES:
        return PAIRWISE_CASES
    return NLEEP_CASES if score == "nleep" else FEATURE_CASES


def make_case(score: str, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """The score's input [N, .] (float64 holding float32 values) and labels [N]."""
    if score in PREDICTION_SCORES:
        probs, labels = make_predictions(*shape)
        return (probs.argmax(1) if score == "nce" else probs), labels
    return make_problem(*shape)


Value = Union[float, np.ndarray]


def _value(out: Any) -> Value:
    """A score as a float, or a pool-normalised score's per-model terms (NCTI) as a float64 array."""
    values = np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    return float(values) if values.ndim == 0 else values


def max_rel_diff(a: Value, b: Value) -> float:
    """The largest |a - b| / |b| over a score's values (one, or its terms)."""
    return max(rel_diff(float(u), float(v)) for u, v in zip(np.ravel(a), np.ravel(b)))


def torch_fn(score: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Value]:
    fn = getattr(torch_logme, score)

    def run() -> Value:
        out = fn(x, y, dtype=torch.float64)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return _value(out)

    return run


def reference_fn(score: str, x: np.ndarray, y: np.ndarray) -> Callable[[], Value]:
    fn = getattr(reference, score)
    return lambda: _value(fn(x, y))


def warm_up(devices: List[str]) -> None:
    """One tiny call of every score so library initialisation is never timed."""
    for score in ALL_SCORES:
        x, y = make_case(score, (64, 8, 4))
        reference_fn(score, x, y)()
        for device in devices:
            torch_fn(score, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))()


def shape_label(score: str, shape: Tuple[int, int, int]) -> str:
    n, k, c = shape
    return f"N={n}, Cs={k}, Ct={c}" if score in PREDICTION_SCORES else f"N={n}, D={k}, C={c}"


def run(scores: List[str], devices: List[str], repeat: int, budget_s: float, check: bool) -> bool:
    warm_up(devices)
    head = ["score", "shape", "reference"]
    for device in devices:
        head += [f"torch {device}", "speed-up"]
    head += ["max rel diff", "runs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ok = True
    for score in scores:
        for shape in cases_of(score):
            x, y = make_case(score, shape)
            fns: Dict[str, Callable[[], Value]] = {"reference": reference_fn(score, x, y)}
            fns["cpu"] = torch_fn(score, torch.from_numpy(x), torch.from_numpy(y))
            if "cuda" in devices:
                # Features as a forward pass leaves them: float32 on the GPU; labels int64.
                xc = torch.from_numpy(x).to("cuda", torch.float32 if score != "nce" else torch.int64)
                fns["cuda"] = torch_fn(score, xc, torch.from_numpy(y).cuda())
            timed = time_interleaved(fns, repeat, budget_s)
            ref_t, ref_v, ref_runs = timed["reference"]
            cells = [score, shape_label(score, shape), fmt_time(ref_t)]
            diffs = []
            for device in devices:
                t, v, _ = timed[device]
                cells += [fmt_time(t), f"{ref_t / t:.1f}x"]
                diffs.append(max_rel_diff(v, ref_v))
            worst = max(diffs)
            ok &= worst <= CHECK_RTOL
            runs = "/".join(str(timed[k][2]) for k in timed)
            print("| " + " | ".join(cells + [f"{worst:.1e}", runs]) + " |", flush=True)
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, median reported (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where torch_logme runs (the reference always runs on the CPU; no CUDA: cpu)")
    parser.add_argument("--budget", type=float, default=20.0, help="stop repeating a cell after this many seconds")
    parser.add_argument("--scores", nargs="+", choices=ALL_SCORES, default=list(ALL_SCORES))
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every score is within 1e-9 of the reference")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); the reference's BLAS is not affected")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()] or ["cpu"]
    print(machine_header())
    print()
    ok = run(args.scores, devices, args.repeat, args.budget, args.check)
    if args.check and not ok:
        print(f"\nFAILED: a score differs from its reference by more than {CHECK_RTOL:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
