"""A self-contained demonstration of LogME on real data.

LogME scores how well the features of a pre-trained extractor will transfer to
a labelled task, without training anything on that task. This demo makes that
claim checkable in a few seconds on a CPU: it builds several deterministic
feature extractors of clearly different quality for the UCI handwritten
digits shipped with the package (``torch_logme/data/digits.npz``), scores each
with :func:`torch_logme.logme`, and compares the LogME ranking with a measured
ground truth, the test accuracy of a linear probe trained on each feature set.
Agreement is summarised by Kendall's tau.

Run it with ``python -m torch_logme demo`` or call :func:`run_demo`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO, Union

import numpy as np
import torch
import torch.nn.functional as F

from torch_logme import logme
from torch_logme.evaluation import kendall_tau  # tau-b as scipy computes it (kept here as demo.kendall_tau)

__all__ = [
    "DemoResult",
    "DemoRow",
    "EXTRACTORS",
    "kendall_tau",
    "linear_probe_accuracy",
    "load_digits",
    "run_demo",
    "stratified_split",
]

DATA_FILE = Path(__file__).resolve().parent / "data" / "digits.npz"

# Pixel values of the UCI digits are counts of set pixels in 4x4 blocks of the
# original 32x32 bitmaps, hence integers in 0..16.
_PIXEL_MAX = 16.0

Device = Union[str, torch.device, None]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the UCI optical-recognition handwritten digits shipped with the package.

    Returns:
        images: float32 tensor [1797, 8, 8] with values in [0, 1].
        labels: int64 tensor [1797] with class ids 0..9.
    """
    with np.load(DATA_FILE) as data:
        images = torch.from_numpy(data["images"].astype(np.float32) / _PIXEL_MAX)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    return images, labels


# ---------------------------------------------------------------------------
# Feature extractors. Each maps images [N, 8, 8] (float32, on the compute
# device) and a seeded CPU generator to features [N, D]. Random weights are
# drawn on the CPU and then moved, so every device sees the same extractor.
# ---------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(like.device)


def _pixels(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.flatten(1)


def _random_mlp(x: torch.Tensor, gen: torch.Generator, width: int = 1024) -> torch.Tensor:
    # A randomly initialised one-hidden-layer network: the "random init"
    # baseline that any pre-training should beat. Inputs are standardised so
    # that the random biases cut the data at meaningful places.
    f = x.flatten(1)
    f = (f - f.mean(0)) / (f.std(0) + 0.1)
    w = _randn(gen, f.shape[1], width, like=f) / math.sqrt(f.shape[1])
    b = _randn(gen, width, like=f)
    return torch.relu(f @ w + b)


def _random_conv(x: torch.Tensor, gen: torch.Generator, filters: int = 64) -> torch.Tensor:
    # Random 3x3 filters with zero mean respond to edges and strokes, and max
    # pooling buys some translation invariance: random convolutional features
    # are known to be strong on small images.
    w = _randn(gen, filters, 1, 3, 3, like=x)
    w = w - w.mean(dim=(2, 3), keepdim=True)
    h = torch.relu(F.conv2d(x[:, None], w, padding=1))
    return F.max_pool2d(h, 2).flatten(1)


def _orientation_histograms(x: torch.Tensor, gen: torch.Generator, bins: int = 8) -> torch.Tensor:
    # HOG-like: central-difference gradients, unsigned orientation soft-binned
    # into `bins` bins weighted by magnitude, pooled in 4x4 cells with stride 2
    # (3x3 overlapping cells), then a square root and a global L2
    # normalisation, which make the histograms robust to stroke thickness.
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
    gy = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
    mag = torch.sqrt(gx * gx + gy * gy)
    pos = torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi * bins - 0.5
    lo = torch.floor(pos)
    frac = pos - lo
    lo = torch.remainder(lo.long(), bins)
    hi = torch.remainder(lo + 1, bins)
    hist = torch.zeros(x.shape[0], bins, *x.shape[1:], dtype=x.dtype, device=x.device)
    hist.scatter_add_(1, lo[:, None], (mag * (1 - frac))[:, None])
    hist.scatter_add_(1, hi[:, None], (mag * frac)[:, None])
    f = F.avg_pool2d(hist, 4, stride=2).flatten(1).sqrt()
    return f / (f.norm(dim=1, keepdim=True) + 1e-6)


def _pca(x: torch.Tensor, gen: torch.Generator, k: int = 8) -> torch.Tensor:
    # Unsupervised linear compression to the top-k principal components.
    f = x.flatten(1)
    f = f - f.mean(0)
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    return f @ vh[:k].T


def _blur(x: torch.Tensor, gen: torch.Generator, k: int) -> torch.Tensor:
    # Mean over k x k blocks: an 8/k x 8/k thumbnail that loses stroke detail.
    return F.avg_pool2d(x[:, None], k).flatten(1)


def _noisy_pixels(x: torch.Tensor, gen: torch.Generator, sigma: float = 1.0) -> torch.Tensor:
    # Noise with the full pixel range as its standard deviation buries most
    # of the signal.
    f = x.flatten(1)
    return f + sigma * _randn(gen, *f.shape, like=f)


def _few_pixels(x: torch.Tensor, gen: torch.Generator, k: int = 4) -> torch.Tensor:
    # Drawn from the central 4x4 block: border pixels are blank in most
    # images, and all-zero features would say nothing about LogME.
    centre = x[:, 2:6, 2:6].flatten(1)
    idx = torch.randperm(centre.shape[1], generator=gen)[:k].to(x.device)
    return centre[:, idx]


Extractor = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: (name, extractor) pairs, roughly from strong to useless features.
EXTRACTORS: list[tuple[str, Extractor]] = [
    ("random conv 3x3 + max-pool", _random_conv),
    ("random ReLU MLP (random init)", _random_mlp),
    ("pixels", _pixels),
    ("orientation histograms (HOG-like)", _orientation_histograms),
    ("PCA, top 8 components", _pca),
    ("blurred 4x4 thumbnail", lambda x, g: _blur(x, g, 2)),
    ("blurred 2x2 thumbnail", lambda x, g: _blur(x, g, 4)),
    ("pixels + strong noise", _noisy_pixels),
    ("4 random pixels", _few_pixels),
]


# ---------------------------------------------------------------------------
# Ground truth: a linear probe.
# ---------------------------------------------------------------------------


def stratified_split(
    labels: torch.Tensor, train_fraction: float = 0.7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into train and test, keeping class proportions.

    Args:
        labels: int tensor [N].
    Returns:
        (train_idx, test_idx): int64 CPU tensors, disjoint, covering 0..N-1.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_train = int(round(train_fraction * idx.numel()))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def linear_probe_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> float:
    """Test accuracy of multinomial logistic regression on standardised features.

    Trained full-batch with L-BFGS (deterministic: no sampling, zero init).

    Args:
        features: [N, D] tensor on any device.
        labels: int64 [N].
        train_idx, test_idx: index tensors into the N samples.
    """
    # MPS has no float64; elsewhere float64 keeps L-BFGS's line search clean.
    dtype = torch.float32 if features.device.type == "mps" else torch.float64
    f = features.to(dtype)
    train_idx = train_idx.to(f.device)
    test_idx = test_idx.to(f.device)
    labels = labels.to(f.device)
    f_train, f_test = f[train_idx], f[test_idx]
    # Standardise with training statistics only, so the test split stays unseen.
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train = (f_train - mean) / std
    f_test = (f_test - mean) / std
    y_train = labels[train_idx]
    num_classes = int(labels.max()) + 1

    w = torch.zeros(f.shape[1], num_classes, dtype=dtype, device=f.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=f.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f_train @ w + b, y_train) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (f_test @ w + b).argmax(1)
        return (pred == labels[test_idx]).double().mean().item()


# ---------------------------------------------------------------------------
# The demo.
# ---------------------------------------------------------------------------


@dataclass
class DemoRow:
    """One extractor's scores. Times are wall-clock seconds of the score alone."""

    name: str
    dim: int
    logme: float
    probe_accuracy: float
    torch_seconds: float
    reference_logme: Optional[float] = None
    reference_seconds: Optional[float] = None


@dataclass
class DemoResult:
    """Rows sorted by LogME, best first, and the rank agreement with the probe."""

    rows: list[DemoRow]
    kendall_tau: float
    device: str
    torch_version: str
    total_seconds: float
    reference_warmup_seconds: Optional[float] = None


def _sync(device: torch.device) -> None:
    # Asynchronous devices must finish queued work before a clock is read.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _warm_up(device: torch.device, compare_reference: bool) -> Optional[float]:
    """Run both implementations once on tiny data so that one-off costs
    (numba's JIT compilation, lazy linear-algebra and CUDA initialisation)
    do not land in the first extractor's timings. Returns the reference's
    warm-up time, which is mostly numba compilation."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(40, 5, generator=gen)
    y = torch.arange(40) % 3
    logme(f.to(device), y.to(device)).item()
    _sync(device)
    if not compare_reference:
        return None
    from torch_logme.reference import LogME as RefLogME

    t0 = time.perf_counter()
    RefLogME().fit(f.double().numpy(), y.numpy())
    return time.perf_counter() - t0


def _format_table(result: DemoResult) -> str:
    has_ref = any(r.reference_logme is not None for r in result.rows)
    name_w = max(len("extractor"), *(len(r.name) for r in result.rows))
    head = f"{'rank':>4}  {'extractor':<{name_w}}  {'dim':>5}  {'LogME':>8}  {'probe acc':>9}  {'torch ms':>8}"
    if has_ref:
        head += f"  {'ref ms':>8}  {'|torch-ref|':>11}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(result.rows, 1):
        line = (
            f"{i:>4}  {r.name:<{name_w}}  {r.dim:>5}  {r.logme:>8.4f}  "
            f"{r.probe_accuracy:>9.4f}  {1e3 * r.torch_seconds:>8.1f}"
        )
        if has_ref:
            if r.reference_logme is None:
                line += f"  {'-':>8}  {'-':>11}"
            else:
                assert r.reference_seconds is not None  # timed with the reference score
                line += (
                    f"  {1e3 * r.reference_seconds:>8.1f}"
                    f"  {abs(r.logme - r.reference_logme):>11.1e}"
                )
        lines.append(line)
    return "\n".join(lines)


def run_demo(
    *,
    seed: int = 0,
    device: Device = None,
    compare_reference: bool = True,
    file: Optional[TextIO] = None,
    extractors: Optional[Sequence[str]] = None,
) -> DemoResult:
    """Rank the demo's feature extractors by LogME and check the ranking
    against linear-probe accuracy on the UCI digits.

    Args:
        seed: seeds the random extractors and the 70/30 train/test split.
        device: where features are computed and scored (default: CPU).
        compare_reference: also score with the NumPy reference
            (:class:`torch_logme.reference.LogME`) and time it.
        file: where the report is printed; ``None`` means the current
            ``sys.stdout``, as for :func:`print`.
        extractors: names from :data:`EXTRACTORS` to run (default: all).
    Returns:
        a :class:`DemoResult` whose rows are sorted by LogME, best first.
    """
    start = time.perf_counter()
    known = [name for name, _ in EXTRACTORS]
    selected = known if extractors is None else list(extractors)
    unknown = sorted(set(selected) - set(known))
    if unknown:
        raise ValueError(f"unknown extractors {unknown}; choose from {known}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    def out(*parts: object) -> None:
        print(*parts, file=file)

    images, labels = load_digits()
    images, labels_dev = images.to(device), labels.to(device)
    labels_np = labels.numpy()
    train_idx, test_idx = stratified_split(labels, 0.7, seed)
    ref_warmup = _warm_up(device, compare_reference)
    if compare_reference:
        from torch_logme.reference import NUMBA_AVAILABLE
        from torch_logme.reference import LogME as RefLogME

    rows = []
    for k, (name, extractor) in enumerate(EXTRACTORS):
        if name not in selected:
            continue
        # One generator per extractor, so adding an extractor leaves the
        # others' random weights unchanged.
        gen = torch.Generator().manual_seed(1000 * seed + k)
        with torch.no_grad():
            feats = extractor(images, gen)

        _sync(device)
        t0 = time.perf_counter()
        score = logme(feats, labels_dev).item()  # .item() waits for the device
        torch_seconds = time.perf_counter() - t0

        ref_score = ref_seconds = None
        if compare_reference:
            feats_np = feats.double().cpu().numpy()
            t0 = time.perf_counter()
            ref_score = RefLogME().fit(feats_np, labels_np)
            ref_seconds = time.perf_counter() - t0

        acc = linear_probe_accuracy(feats, labels, train_idx, test_idx)
        rows.append(DemoRow(name, feats.shape[1], score, acc, torch_seconds, ref_score, ref_seconds))

    rows.sort(key=lambda r: r.logme, reverse=True)
    tau = kendall_tau([r.logme for r in rows], [r.probe_accuracy for r in rows])
    result = DemoResult(
        rows=rows,
        kendall_tau=tau,
        device=str(device),
        torch_version=torch.__version__,
        total_seconds=0.0,
        reference_warmup_seconds=ref_warmup,
    )

    n = labels.numel()
    out(
        f"LogME demo: ranking {len(rows)} feature extractors on the UCI handwritten digits "
        f"({n} images 8x8, {int(labels.max()) + 1} classes)"
    )
    ref_note = "reference: off"
    if compare_reference:
        backend = "numpy + numba" if NUMBA_AVAILABLE else "numpy (numba not installed)"
        ref_note = f"reference: {backend}, warm-up {ref_warmup:.2f} s excluded from its times"
    out(f"torch {torch.__version__} | device {device} | {ref_note}")
    out(
        "ground truth: test accuracy of a linear probe (multinomial logistic regression, L-BFGS,\n"
        f"standardised features) on a stratified 70/30 split ({train_idx.numel()} train / "
        f"{test_idx.numel()} test), seed {seed}"
    )
    out()
    out(_format_table(result))
    out()
    out(
        f"Kendall's tau between LogME and probe accuracy: {tau:+.3f} "
        f"(+1 = same ranking, 0 = unrelated, -1 = reversed)"
    )
    out(
        "LogME is the log marginal evidence per sample (a log-density, not a probability):\n"
        "larger is better, it can be negative or exceed 1, and scores compare only on the same data and labels."
    )
    result.total_seconds = time.perf_counter() - start
    out(f"total time {result.total_seconds:.1f} s")
    return result
