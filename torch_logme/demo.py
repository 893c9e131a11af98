"""A self-contained demonstration of the transferability scores on real data.

A transferability score says how well the features of a pre-trained
extractor will transfer to a labelled task, without training anything on
that task. This demo makes that claim checkable in well under a minute on one
CPU core: it builds several deterministic feature extractors of clearly
different quality for the UCI handwritten digits shipped with the package
(``torch_logme/data/digits.npz``), scores each with every registered score
(:data:`torch_logme.SCORES`), and compares each score's ranking of the
extractors with a measured ground truth, the test accuracy of a linear probe
trained on each feature set. Agreement is summarised per score by the
weighted Kendall tau (:func:`torch_logme.weighted_tau`, the statistic of the
transferability literature) and Kendall's tau-b.

Held-out ground truth. The digits are split once, stratified 70/30 by
``seed``. Every score reads the training split only (1258 images at seed 0):
its features, its labels and, for LEEP and NCE, its source predictions. The
probe is trained on the same training split and its accuracy measured on the
test split (539 images), which no score ever sees.

Source models for LEEP and NCE. These two scores do not read features: they
read a *source model's* predictions over its own *source* classes. The
extractors here have no classification head, so the demo gives each one a
source model trained on a source task of its own that uses no target label:
the extractor's features of the training images are clustered by k-means
into :data:`SOURCE_CLASSES` pseudo-classes (seeded k-means++ and Lloyd,
:func:`torch_logme.nleep.kmeans_labels`), as self-supervised pre-training by
clustering does (DeepCluster, Caron et al., ECCV 2018), and the source model
is the nearest-centroid classifier of those pseudo-classes: the posterior of
the isotropic Gaussian mixture that k-means fits (one variance, the
maximum-likelihood one, shared by all clusters; cluster sizes as priors),
which is a linear softmax head on the features. Its probabilities over the
pseudo-classes are LEEP's input; NCE takes their argmax as hard source
labels (the registry's ``nce`` does that). The number of source classes is
fixed, not taken from the target task. What this measures: how well the
extractor's own cluster structure predicts the digit classes. That is the
idea of NLEEP too (a Gaussian mixture on PCA-reduced features), so on this
demo LEEP and NCE are close relatives of NLEEP, not evidence about
supervised source heads. The source model is fitted to the training images
(unlabelled), never to the test images.

Pooled scores. NCTI and ETran normalise their terms across the pool of
candidate models (``ScoreSpec.pooled`` / ``combine``): the demo keeps each
extractor's terms and combines them once every selected extractor is
scored, as :func:`torch_logme.rank_models` does, so their values depend on
which extractors run. Every score runs with its default options.

Run it with ``python -m torch_logme demo`` or call :func:`run_demo`. It
prints one progress line per extractor as it finishes, then the tables.
"""
from __future__ import annotations

import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from torch_logme._pool import combine_terms, pooled_note
from torch_logme.evaluation import (
    ScoreEvaluation,
    evaluate_scores,
    kendall_tau,  # tau-b as scipy computes it (kept here as demo.kendall_tau)
)
from torch_logme.nleep import kmeans_labels
from torch_logme.ranking import ModelScoreError, rank_models
from torch_logme.registry import SCORES

__all__ = [
    "DemoResult",
    "DemoRow",
    "EXTRACTORS",
    "SOURCE_CLASSES",
    "kendall_tau",
    "linear_probe_accuracy",
    "load_digits",
    "run_demo",
    "source_probabilities",
    "stratified_split",
]

DATA_FILE = Path(__file__).resolve().parent / "data" / "digits.npz"

# Pixel values of the UCI digits are counts of set pixels in 4x4 blocks of the
# original 32x32 bitmaps, hence integers in 0..16.
_PIXEL_MAX = 16.0

#: Pseudo-classes of the source task that LEEP's and NCE's source models are
#: trained on (k-means clusters of each extractor's features; see the module
#: docstring). Fixed: the source task does not know the target's classes.
SOURCE_CLASSES = 50

# The longest line the demo prints, as a rule.
_WIDTH = 120

#: Fraction of each class in the training split (the rest is the test split).
TRAIN_FRACTION = 0.7

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
# Source models for the scores that read predictions (LEEP, NCE).
# ---------------------------------------------------------------------------


def source_probabilities(features: torch.Tensor, num_classes: int = SOURCE_CLASSES, *, seed: int = 0) -> torch.Tensor:
    """Predictions [N, K] of a source model trained without labels on ``features`` [N, D].

    The source task: the K = ``num_classes`` k-means clusters of the rows
    (``kmeans_labels``, seeded by ``seed``; K is capped at N). The source
    model: their nearest-centroid classifier, i.e. the posterior of the
    Gaussian mixture with the clusters' means, their sizes as priors and one
    isotropic variance (the maximum-likelihood one, the mean squared
    distance of a row to its centre per dimension) shared by all:
    ``softmax(-|x - c_k|^2 / (2 var) + log n_k)``. It is linear in x, a
    softmax head on the features. Rows identical to their centres (variance
    0) give one-hot predictions. Computed in float64 (float32 on MPS), on
    the features' device.
    """
    dtype = torch.float32 if features.device.type == "mps" else torch.float64
    x = features.detach().to(dtype)
    k = max(1, min(int(num_classes), x.shape[0]))
    assign = kmeans_labels(x, k, np.random.default_rng(seed))
    counts = torch.bincount(assign, minlength=k).to(dtype)
    centres = torch.zeros(k, x.shape[1], dtype=dtype, device=x.device).index_add_(0, assign, x)
    centres /= counts.clamp_min(1)[:, None]
    sq = ((x * x).sum(1, keepdim=True) - 2 * (x @ centres.T) + (centres * centres).sum(1)).clamp_min_(0)
    variance = float(sq.gather(1, assign[:, None]).sum()) / x.numel()
    if not variance > 0:
        return F.one_hot(assign, k).to(dtype)
    # log(0) = -inf: a cluster left empty by Lloyd's last step predicts nothing.
    return torch.softmax(-sq / (2 * variance) + counts.log(), dim=1)


# ---------------------------------------------------------------------------
# The demo.
# ---------------------------------------------------------------------------


@dataclass
class DemoRow:
    """One extractor's results. Times are wall-clock seconds.

    ``logme`` and ``torch_seconds`` are LogME's value and time (also in
    ``scores`` and ``score_seconds``); ``reference_*`` the NumPy
    reference's, when compared. ``scores`` holds every registered score by
    name, computed on the ``scored_rows`` training images (NaN where the
    score failed; ``errors`` says why). The pooled scores (NCTI, ETran) are
    combined across the extractors of the run; ``terms`` holds their
    per-extractor terms as "<score>.<term>". ``feature_seconds``,
    ``source_seconds`` and ``probe_seconds`` time the features, the source
    model (LEEP, NCE) and the linear probe.
    """

    name: str
    dim: int
    logme: float
    probe_accuracy: float
    torch_seconds: float
    reference_logme: Optional[float] = None
    reference_seconds: Optional[float] = None
    scores: Dict[str, float] = field(default_factory=dict)
    score_seconds: Dict[str, float] = field(default_factory=dict)
    terms: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    scored_rows: int = 0
    feature_seconds: float = 0.0
    source_seconds: float = 0.0
    probe_seconds: float = 0.0


@dataclass
class DemoResult:
    """Rows sorted by LogME, best first, and each score's agreement with the probe.

    ``kendall_tau``: Kendall's tau-b of LogME against the probe accuracy.
    ``weighted_taus`` / ``kendall_taus``: the weighted Kendall tau and tau-b of
    every registered score against it (NaN when undefined: a score that
    failed on some extractor, fewer than 2 extractors, or a constant
    sequence); ``evaluations`` the full :class:`ScoreEvaluation` of each
    score that has a value for every extractor. ``train_size`` rows were
    scored; the probe was tested on ``test_size`` others.
    """

    rows: List[DemoRow]
    kendall_tau: float
    device: str
    torch_version: str
    total_seconds: float
    reference_warmup_seconds: Optional[float] = None
    weighted_taus: Dict[str, float] = field(default_factory=dict)
    kendall_taus: Dict[str, float] = field(default_factory=dict)
    evaluations: Dict[str, ScoreEvaluation] = field(default_factory=dict)
    train_size: int = 0
    test_size: int = 0
    source_classes: int = SOURCE_CLASSES
    notes: Tuple[str, ...] = ()

    @property
    def weighted_tau(self) -> float:
        """The weighted Kendall tau of LogME against the probe accuracy."""
        return self.weighted_taus.get("logme", math.nan)

    def scores_best_first(self) -> List[str]:
        """The score names by weighted tau against the probe, best first (NaN last, then registry order)."""
        names = list(self.weighted_taus)
        return sorted(names, key=lambda s: (math.isnan(self.weighted_taus[s]), -_or_zero(self.weighted_taus[s])))


def _or_zero(v: float) -> float:
    return 0.0 if math.isnan(v) else v


def _sync(device: torch.device) -> None:
    # Asynchronous devices must finish queued work before a clock is read.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _warm_up(device: torch.device, compare_reference: bool) -> Optional[float]:
    """Run every score, the source model, the probe and the reference once on tiny data,
    so that one-off costs (numba's JIT compilation, lazy linear-algebra and
    CUDA initialisation) do not land in the first extractor's timings.
    Returns the reference's warm-up time, which is mostly numba compilation."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(60, 5, generator=gen).to(device)
    y = (torch.arange(60) % 3).to(device)
    model = {"features": f, "probs": source_probabilities(f, 4)}
    for name in SCORES:
        try:
            rank_models({"warm-up": model}, y, (name,))
        except ModelScoreError:  # tiny data may not suit a score; timing only
            pass
    linear_probe_accuracy(f, y, torch.arange(40), torch.arange(40, 60))
    _sync(device)
    if not compare_reference:
        return None
    from torch_logme.reference import LogME as RefLogME

    t0 = time.perf_counter()
    RefLogME().fit(f.double().cpu().numpy(), y.cpu().numpy())
    return time.perf_counter() - t0


def _score_one(
    name: str, model: Mapping[str, torch.Tensor], labels: torch.Tensor, device: torch.device, row: DemoRow
) -> Dict[str, torch.Tensor]:
    """Every registered score of one extractor into ``row`` (timed one by one); returns the pooled scores' terms."""
    pooled_terms: Dict[str, torch.Tensor] = {}
    for s, spec in SCORES.items():
        _sync(device)
        t0 = time.perf_counter()
        try:
            values = rank_models({name: model}, labels, (s,))[0].scores  # float(): waits for the device
        except ModelScoreError as err:
            values = {}
            row.errors[s] = err.reason
        row.score_seconds[s] = time.perf_counter() - t0
        if s in row.errors:
            row.scores[s] = math.nan
        elif spec.pooled:
            # rank_models combined a pool of one; the pool is every extractor, combined in run_demo.
            row.terms.update({k: v for k, v in values.items() if k.startswith(f"{s}.")})
            pooled_terms[s] = torch.tensor([values[f"{s}.{t}"] for t in spec.terms], dtype=torch.float64)
            row.scores[s] = math.nan
        else:
            row.scores[s] = values[s]
    return pooled_terms


def _combine_pooled(rows: Sequence[DemoRow], terms: Sequence[Dict[str, torch.Tensor]]) -> List[str]:
    """Each pooled score's terms combined across the extractors that have them; returns the notes."""
    notes = []
    for s, spec in SCORES.items():
        if not spec.pooled:
            continue
        have = [i for i, t in enumerate(terms) if s in t]
        if have:
            for i, v in zip(have, combine_terms(spec, [terms[i][s] for i in have])):
                rows[i].scores[s] = v
        notes.append(pooled_note(spec, f"the {len(have)} extractors run here, as its published code does",
                                 "extractors"))
    return notes


def _agreement(result: DemoResult) -> None:
    """Fill ``result``'s taus: each score against the probe accuracy, over the rows."""
    rows = result.rows
    result.weighted_taus = {s: math.nan for s in SCORES}
    result.kendall_taus = {s: math.nan for s in SCORES}
    complete = [s for s in SCORES if all(math.isfinite(r.scores.get(s, math.nan)) for r in rows)]
    if len(rows) < 2 or not complete:
        return
    evaluation = evaluate_scores(
        {r.name: {s: r.scores[s] for s in complete} for r in rows},
        {r.name: r.probe_accuracy for r in rows},
    )
    result.evaluations = dict(evaluation.tasks[0].scores)
    for s, e in result.evaluations.items():
        result.weighted_taus[s] = e.weighted_tau
        result.kendall_taus[s] = e.kendall_tau


def _number(v: float, decimals: Optional[int]) -> str:
    """``v`` in at most 9 characters: fixed with ``decimals``, or in exponent form when None."""
    if math.isnan(v):
        return "n/a"
    return f"{v:.2e}" if decimals is None else f"{v:.{decimals}f}"


def _decimals(values: Sequence[float]) -> Optional[int]:
    """Decimals that show a row of values with about 5 significant digits in fixed form, or None
    (exponent form) when a value is too small or too large for that."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    if not finite or all(v == 0 for v in finite):
        return 4
    if any(v != 0 and (v < 1e-3 or v >= 1e5) for v in finite):
        return None
    return max(0, min(4, 4 - int(math.floor(math.log10(max(finite))))))


def _extractor_table(result: DemoResult) -> str:
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


def _score_table(result: DemoResult) -> str:
    """Scores as rows, extractors (by LogME rank) as columns: the wide table transposed."""
    label_w = max(len("probe acc (test)"), *(len(s) for s in SCORES))
    head = f"{'score':<{label_w}}" + "".join(f" {'#' + str(i):>9}" for i in range(1, len(result.rows) + 1))
    head += f"  {'time s':>6}"
    lines = [head, "-" * len(head)]
    for s in SCORES:
        values = [r.scores.get(s, math.nan) for r in result.rows]
        decimals = _decimals(values)
        seconds = sum(r.score_seconds.get(s, 0.0) for r in result.rows)
        lines.append(
            f"{s:<{label_w}}" + "".join(f" {_number(v, decimals):>9}" for v in values) + f"  {seconds:>6.2f}"
        )
    lines.append("-" * len(head))
    lines.append(f"{'probe acc (test)':<{label_w}}" + "".join(f" {r.probe_accuracy:>9.4f}" for r in result.rows))
    return "\n".join(lines)


def _tau_table(result: DemoResult) -> str:
    rank = {r.name: i for i, r in enumerate(result.rows, 1)}
    label_w = max(len("score"), *(len(s) for s in SCORES))
    head = f"{'score':<{label_w}}  {'weighted tau':>12}  {'Kendall tau':>11}  {'top-1':<5}  picks"
    lines = [head, "-" * len(head)]
    for s in result.scores_best_first():
        e = result.evaluations.get(s)
        if e is None:
            lines.append(f"{s:<{label_w}}  {'n/a':>12}  {'n/a':>11}  {'-':<5}  -")
            continue
        wt, kt = result.weighted_taus[s], result.kendall_taus[s]
        lines.append(
            f"{s:<{label_w}}  {wt:>+12.3f}  {kt:>+11.3f}  {'yes' if e.top1 else 'no':<5}  #{rank[e.pick]} {e.pick}"
        )
    return "\n".join(lines)


def _progress(i: int, n: int, row: DemoRow, name_w: int) -> str:
    scored = sum(row.score_seconds.values())
    line = (
        f"[{i}/{n}] {row.name:<{name_w}}  features {row.feature_seconds:.2f} s | source {row.source_seconds:.2f} s"
        f" | {len(row.score_seconds)} scores {scored:.2f} s"
        f" | probe {row.probe_accuracy:.4f} ({row.probe_seconds:.2f} s)"
    )
    for s, reason in row.errors.items():
        line += f"\n      {s} failed: {reason}"
    return line


def run_demo(
    *,
    seed: int = 0,
    device: Device = None,
    compare_reference: bool = True,
    file: Optional[TextIO] = None,
    extractors: Optional[Sequence[str]] = None,
) -> DemoResult:
    """Score the demo's feature extractors with every registered score and
    check each score's ranking against linear-probe accuracy on held-out digits.

    The scores read the training split only; the probe is trained on it and
    tested on the rest. One progress line is printed per extractor as it
    finishes, then the tables: the extractors by LogME (with the NumPy
    reference's LogME and time), every score per extractor, and each
    score's weighted Kendall tau and Kendall tau against the probe, best
    first.

    Args:
        seed: seeds the random extractors, the 70/30 train/test split and
            the source models' k-means.
        device: where features are computed and scored (default: CPU).
        compare_reference: also compute LogME with the NumPy reference
            (:class:`torch_logme.reference.LogME`) and time it.
        file: where the report is printed; ``None`` means the current
            ``sys.stdout``, as for :func:`print`.
        extractors: names from :data:`EXTRACTORS` to run (default: all).
            The pooled scores (NCTI, ETran) are combined over those run.
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
        print(*parts, file=file, flush=True)  # flushed: progress shows as it happens

    images, labels = load_digits()
    images = images.to(device)
    train_idx, test_idx = stratified_split(labels, TRAIN_FRACTION, seed)
    y_train = labels[train_idx].to(device)
    y_train_np = labels[train_idx].numpy()
    ref_warmup = _warm_up(device, compare_reference)
    if compare_reference:
        from torch_logme.reference import NUMBA_AVAILABLE
        from torch_logme.reference import LogME as RefLogME

    runs = [(k, name, extractor) for k, (name, extractor) in enumerate(EXTRACTORS) if name in selected]
    n = labels.numel()
    out(
        f"Transferability demo: {len(SCORES)} scores of {len(runs)} feature extractors on the UCI handwritten "
        f"digits ({n} images 8x8, {int(labels.max()) + 1} classes)"
    )
    ref_note = "LogME reference: off"
    if compare_reference:
        backend = "numpy + numba" if NUMBA_AVAILABLE else "numpy (numba not installed)"
        ref_note = f"LogME reference: {backend}, warm-up {ref_warmup:.2f} s excluded from its times"
    out(f"torch {torch.__version__} | device {device} | {ref_note}")
    out(
        f"scores: on the training split only, {train_idx.numel()} images (stratified "
        f"{round(100 * TRAIN_FRACTION)}/{round(100 * (1 - TRAIN_FRACTION))} split, seed {seed}), default options;\n"
        f"  LEEP and NCE read a source model per extractor: the nearest-centroid classifier of {SOURCE_CLASSES} "
        "k-means pseudo-classes\n  of its training features, fitted without labels (see torch_logme.demo's docstring)"
    )
    out(
        f"ground truth: test accuracy on the {test_idx.numel()} held-out images of a linear probe trained on the "
        "training split\n  (multinomial logistic regression, L-BFGS, standardised features)"
    )
    out()

    rows: List[DemoRow] = []
    terms: List[Dict[str, torch.Tensor]] = []
    name_w = max(len(name) for _, name, _ in runs)
    for i, (k, name, extractor) in enumerate(runs, 1):
        # One generator per extractor, so adding an extractor leaves the
        # others' random weights unchanged.
        gen = torch.Generator().manual_seed(1000 * seed + k)
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = extractor(images, gen)
        _sync(device)
        feature_seconds = time.perf_counter() - t0
        f_train = feats[train_idx.to(device)]

        t0 = time.perf_counter()
        probs = source_probabilities(f_train, SOURCE_CLASSES, seed=1000 * seed + k)
        _sync(device)
        source_seconds = time.perf_counter() - t0

        row = DemoRow(name, feats.shape[1], math.nan, math.nan, 0.0, scored_rows=f_train.shape[0],
                      feature_seconds=feature_seconds, source_seconds=source_seconds)
        terms.append(_score_one(name, {"features": f_train, "probs": probs}, y_train, device, row))
        row.logme = row.scores["logme"]
        row.torch_seconds = row.score_seconds["logme"]

        if compare_reference:
            feats_np = f_train.double().cpu().numpy()
            t0 = time.perf_counter()
            row.reference_logme = RefLogME().fit(feats_np, y_train_np)
            row.reference_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        row.probe_accuracy = linear_probe_accuracy(feats, labels, train_idx, test_idx)
        row.probe_seconds = time.perf_counter() - t0
        rows.append(row)
        out(_progress(i, len(runs), row, name_w))

    notes = _combine_pooled(rows, terms)
    rows.sort(key=lambda r: (math.isnan(r.logme), -_or_zero(r.logme)))
    result = DemoResult(
        rows=rows,
        kendall_tau=math.nan,
        device=str(device),
        torch_version=torch.__version__,
        total_seconds=0.0,
        reference_warmup_seconds=ref_warmup,
        train_size=train_idx.numel(),
        test_size=test_idx.numel(),
        notes=tuple(notes),
    )
    _agreement(result)
    result.kendall_tau = result.kendall_taus["logme"]

    out()
    out("extractors, best LogME first (scores on the training split; probe accuracy on the test split)")
    out(_extractor_table(result))
    out()
    out("every score (columns: the extractors above, by rank; larger is better for each; time: over all extractors)")
    out(_score_table(result))
    out()
    out(
        f"agreement of each score with the probe accuracy over the {len(rows)} extractors, best first\n"
        "  (+1 = same order, 0 = unrelated, -1 = reversed; weighted tau: hyperbolic weights, swaps among the best\n"
        "  count more; top-1: the extractor the score ranks first is the best by the probe)"
    )
    out(_tau_table(result))
    out()
    out(
        f"Kendall's tau between LogME and probe accuracy: {result.kendall_tau:+.3f} "
        f"(weighted tau {result.weighted_tau:+.3f})"
    )
    notes.append(
        "LogME is the log marginal evidence per sample (a log-density, not a probability): larger is better, "
        "it can be negative or exceed 1, and scores compare only on the same data and labels"
    )
    for note in notes:
        out(textwrap.fill(f"note: {note}", width=_WIDTH, subsequent_indent="  "))
    result.total_seconds = time.perf_counter() - start
    phases = {
        "features": sum(r.feature_seconds for r in rows),
        "source models": sum(r.source_seconds for r in rows),
        "scores": sum(sum(r.score_seconds.values()) for r in rows),
        "probes": sum(r.probe_seconds for r in rows),
    }
    if compare_reference:
        phases["LogME reference"] = (ref_warmup or 0.0) + sum(r.reference_seconds or 0.0 for r in rows)
    out(f"total time {result.total_seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")")
    return result
