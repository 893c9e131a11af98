"""PARC (Bolya et al., NeurIPS 2021): how well the samples' feature geometry matches their labels.

The published score (github.com/dbolya/parc, reused by TencentARC/SFDA's
``PARC_Score``): reduce the features to 32 principal components, standardise
each component, take the pairwise dissimilarities 1 - Pearson correlation of
the samples' reduced rows, and the same of their one-hot labels, and return
100 times the Spearman correlation of the two over the N (N - 1) / 2 pairs.

The label dissimilarity has two values only (0 for a pair of one class,
C / (C - 1) otherwise), so its ranks are closed-form, and the Spearman
correlation needs only the sum of the feature-side ranks over the pairs of
one class and the sizes of the tied groups of feature-side values. Those
ranks are global: this module finds them without holding the N^2 / 2 values,
by passes over the row blocks of the N x N correlations. When all the pairs
fit in ``pairs_per_pass`` one pass collects and sorts them. Otherwise a
counting pass puts the values in 65536 intervals of [0, 2] (an interval over
budget whose values differ is split 65536 ways by another counting pass, a
rare case); an interval of one repeated value is ranked from its counts, and
each run of other intervals of at most ``pairs_per_pass`` values is collected
by one more pass, sorted and ranked after the values of the intervals below.
Memory is O(block x N + pairs_per_pass) (more only if more than
pairs_per_pass distinct values lie within a few ulps of each other); time
is one N x N x k product per pass, and there are about
N (N - 1) / (2 pairs_per_pass) + 1 passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import prepare
from ._options import compute_options
from ._primitives import chunk_length
from ._validators import one_of, positive_int
from .scores import Frame, framed, make_frame
from .sums import CONSTANT_COLUMN_EPS

__all__ = ["parc", "PCA_SOLVERS"]

Device = Union[str, torch.device, None]

#: How the principal components are found: "exact" (a QR then SVD of the
#: centred features) or "randomized" (scikit-learn's randomized PCA with the
#: published settings, to reproduce the published numbers).
PCA_SOLVERS = ("exact", "randomized")
#: The published randomized PCA: random_state=1919, iterated_power=1 and
#: scikit-learn's default 10 oversamples.
RANDOM_STATE = 1919
OVERSAMPLES = 10
#: Intervals of the dissimilarities in [0, 2] that the first counting pass uses, and that
#: each interval over budget is split into.
BINS = 1 << 16
#: Pair values one ranking pass holds by default (about 34 bytes each in float64).
CPU_PAIRS = 1 << 24
DEVICE_PAIRS = 1 << 26

Rows = Callable[[slice], Tensor]


# -- the reduced features ----------------------------------------------------------


def _slices(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _tall_r(pieces: Iterator[Tensor]) -> Tensor:
    """R of the QR factorisation of the rows stacked from ``pieces`` (each [B, m], B >= m for the first)."""
    r: Optional[Tensor] = None
    for piece in pieces:
        r = torch.linalg.qr(piece if r is None else torch.cat([r, piece]), mode="r").R
    assert r is not None
    return r


def _signs(components: Tensor) -> Tensor:
    """[k] +-1: the sign of each row's largest |entry| (the first on a tie), scikit-learn's PCA convention."""
    at = components.abs().argmax(1, keepdim=True)
    return torch.where(components.gather(1, at)[:, 0] < 0, -1.0, 1.0).to(components.dtype)


def _exact_pca(f: Tensor, rows: Rows, cols: Rows, k: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(scores [N, k], singular values [k]) of the centred features x [N, D] (``rows``/``cols`` slice it).

    Through the R factor of the QR of x (N >= D) or of x^T (N < D), built a
    chunk at a time: as accurate as an SVD of x itself, where the Gram
    matrix would square the spread of the singular values.
    """
    n, d = f.shape
    device = f.device
    if n >= d:
        step = max(chunk_length(n, d, dtype, device), 2 * d)
        _, s, vh = torch.linalg.svd(_tall_r(rows(part) for part in _slices(n, step)))
        vh = vh[:k] * _signs(vh[:k])[:, None]
        return torch.cat([rows(part) @ vh.T for part in _slices(n, step)]), s[:k]
    step = max(chunk_length(d, n, dtype, device), 2 * n)
    # x = R^T Q^T, so the left singular vectors and values of x are those of R^T.
    u, s, _ = torch.linalg.svd(_tall_r(cols(part).T for part in _slices(d, step)).T)
    u, s = u[:, :k], s[:k]
    # Each component x^T u_j / s_j is read a chunk of columns at a time, for its largest entry's sign.
    best = torch.zeros(k, dtype=dtype, device=device)
    sign = torch.ones(k, dtype=dtype, device=device)
    for part in _slices(d, step):
        v = cols(part).T @ u
        size, at = v.abs().max(0)
        larger = size > best
        sign = torch.where(larger, torch.where(v.gather(0, at[None])[0] < 0, -1.0, 1.0).to(dtype), sign)
        best = torch.where(larger, size, best)
    return u * (s * sign), s


def _randomized_pca(f: Tensor, rows: Rows, k: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(scores [N, k], singular values [k]) of scikit-learn's ``PCA(k, svd_solver="randomized",
    random_state=1919, iterated_power=1)`` on the centred features x [N, D], as the published code runs it.

    Halko et al.'s range finder with one power iteration and no
    normalisation between its products, the Gaussian test matrix drawn from
    numpy's RandomState(1919) as scikit-learn draws it (on x^T when N < D),
    then scikit-learn's sign rule. An approximation of the exact
    components, which ``pca="exact"`` gives.
    """
    n, d = f.shape
    device = f.device
    step = chunk_length(n, d, dtype, device)
    parts = list(_slices(n, step))

    def times(a: Tensor) -> Tensor:  # x a, for a [D, p]
        return torch.cat([rows(part) @ a for part in parts])

    def times_t(b: Tensor) -> Tensor:  # x^T b, for b [N, p]
        out = torch.zeros(d, b.shape[1], dtype=dtype, device=device)
        for part in parts:
            out.addmm_(rows(part).T, b[part])
        return out

    transpose = n < d
    draws = np.random.RandomState(RANDOM_STATE).normal(size=(n if transpose else d, k + OVERSAMPLES))
    omega = torch.from_numpy(draws).to(device=device, dtype=dtype)
    if transpose:  # scikit-learn works on x^T
        q = torch.linalg.qr(times_t(times(times_t(omega)))).Q  # [D, p]
        basis, s, vt = torch.linalg.svd(times(q).T, full_matrices=False)
        scores, components = vt.T, (q @ basis).T
    else:
        q = torch.linalg.qr(times(times_t(times(omega)))).Q  # [N, p]
        basis, s, components = torch.linalg.svd(times_t(q).T, full_matrices=False)
        scores = q @ basis
    sign = _signs(components[:k])
    return scores[:, :k] * (s[:k] * sign), s[:k]


def _standardised(scores: Tensor, keep: Tensor) -> Tensor:
    """Columns of ``scores`` [N, k] centred and scaled to unit variance (normalised by N); 0 where not ``keep``."""
    centred = scores - scores.mean(0)
    std = centred.square().mean(0).sqrt()
    keep = keep & (std > 0)
    return torch.where(keep, centred / torch.where(keep, std, torch.ones_like(std)), torch.zeros_like(centred))


def _reduced(f: Tensor, frame: Frame, n_dims: Optional[int], pca: str, dtype: torch.dtype) -> Tensor:
    """[N, k]: the standardised principal components of features f [N, D] (or f standardised, n_dims None)."""
    n, d = f.shape
    scale, centre = frame.scale, frame.centre

    def rows(part: slice) -> Tensor:
        return framed(f[part], dtype, frame.shift, scale, centre)

    def cols(part: slice) -> Tensor:
        return framed(f[:, part], dtype, frame.shift[part], None if scale is None else scale[part],
                      None if centre is None else centre[part])

    if n_dims is None:
        x = torch.cat([rows(part) for part in _slices(n, chunk_length(n, d, dtype, f.device))])
        mean = x.mean(0)
        var = (x - mean).square().mean(0)
        # A column is constant when its variance is round-off of its mean square about the shift.
        offset = mean if centre is None else mean + centre.to(dtype)
        eps = torch.finfo(dtype).eps
        return _standardised(x, var > CONSTANT_COLUMN_EPS * eps * (var + offset * offset))
    k = min(n_dims, n, d)
    scores, s = _exact_pca(f, rows, cols, k, dtype) if pca == "exact" else _randomized_pca(f, rows, k, dtype)
    # Components below round-off of the largest are zeros in exact arithmetic (the features' rank is
    # below k): standardising them would blow their round-off up to unit variance.
    tol = max(n, d) * torch.finfo(dtype).eps * s[0]
    return _standardised(scores, s > tol)


def _unit_rows(z: Tensor) -> Tensor:
    """Rows of z [N, k] less their mean, scaled to norm 1 (0 for a row that is constant): u_i . u_j is
    the Pearson correlation of rows i and j."""
    centred = z - z.mean(1, keepdim=True)
    norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    flat = norm <= z.shape[1] * torch.finfo(z.dtype).eps * z.abs().amax(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred / torch.where(flat, torch.ones_like(norm), norm))


# -- the ranks of the pairwise dissimilarities -------------------------------------


def _pair_values(u: Tensor, y: Tensor, step: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Per row block of the unit rows u [N, k]: the dissimilarities 1 - r of its pairs i < j [V], and
    which of those pairs are of one class [V] (labels y [N])."""
    n = u.shape[0]
    for part in _slices(n, step):
        # Against the block's own rows (the strict upper triangle) and the rows after it (all pairs).
        width = part.stop - part.start
        upper = torch.triu(torch.ones(width, width, dtype=torch.bool, device=u.device), diagonal=1)
        values, one_class = [], []
        for cols, mask in ((part, upper), (slice(part.stop, n), None)):
            r = u[part] @ u[cols].T
            dissimilarity = torch.sub(1.0, r.clamp_(-1.0, 1.0), out=r)
            same = y[part][:, None] == y[cols][None, :]
            values.append(dissimilarity.reshape(-1) if mask is None else dissimilarity[mask])
            one_class.append(same.reshape(-1) if mask is None else same[mask])
        yield torch.cat(values), torch.cat(one_class)


#: Which pair values a pass takes: dissimilarities [V] -> bool [V] (None: all).
Select = Optional[Callable[[Tensor], Tensor]]


@dataclass
class _Ranks:
    """What the Spearman correlation needs of the ranks: twice the rank sum of the one-class pairs'
    values (average ranks, 1-based), and sum of t^3 - t over the groups of t equal values."""

    twice_in_class: int = 0
    ties: float = 0.0


def _taken(u: Tensor, y: Tensor, step: int, select: Select) -> Iterator[Tuple[Tensor, Tensor]]:
    """Per row block, the pair values i < j that ``select`` takes [V], and which of them are of one class [V]."""
    for values, one_class in _pair_values(u, y, step):
        if select is None:
            yield values, one_class
        else:
            keep = select(values)
            yield values[keep], one_class[keep]


def _sorted(values: Tensor) -> Tensor:
    """``values`` [M] in increasing order, sorted in place (the caller's tensor is consumed)."""
    if values.device.type == "cpu":
        # numpy sorts in place, without torch.sort's index array, 4-5x faster (4.5M float64: 0.22 s, 1.0 s).
        values.numpy().sort()
        return values
    return torch.sort(values).values


def _collect(u: Tensor, y: Tensor, step: int, select: Select, count: int, before: int, ranks: _Ranks) -> None:
    """Sort the ``count`` pair values that ``select`` takes, ``before`` values lying below them, and add
    their ranks."""
    values = torch.empty(count, dtype=u.dtype, device=u.device)
    in_class: List[Tensor] = []
    filled = 0
    for got, one_class in _taken(u, y, step, select):
        if filled + got.numel() > count:
            break
        values[filled:filled + got.numel()] = got
        in_class.append(got[one_class])
        filled += got.numel()
    if filled != count:
        raise RuntimeError(
            "PARC: the pairwise correlations came out differently in two passes over the same data "
            "(a non-deterministic matrix product); rerun with pairs_per_pass at least N (N - 1) / 2 (one pass)"
        )
    ordered = _sorted(values)
    # Queries in order: the binary searches then share their paths (4x faster at a few million values).
    same = _sorted(torch.cat(in_class))
    # A value equal to those at positions left+1 .. right (1-based) has average rank (left + 1 + right) / 2.
    left = torch.searchsorted(ordered, same)
    right = torch.searchsorted(ordered, same, right=True)
    ranks.twice_in_class += int((left + right).sum()) + (2 * before + 1) * same.numel()
    sizes = torch.unique_consecutive(ordered, return_counts=True)[1]
    tied = sizes[sizes > 1].to(torch.float64)
    ranks.ties += float((tied * tied * tied - tied).sum())


def _both(first: Select, second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return second if first is None else (lambda d: first(d) & second(d))


def _rank_bins(u: Tensor, y: Tensor, step: int, budget: int, select: Select, low: float, high: float,
               before: int, ranks: _Ranks) -> None:
    """Rank the pair values that ``select`` takes, all in [low, high] with ``before`` values below them.

    A counting pass puts them in BINS bins of [low, high]; runs of bins of
    at most ``budget`` values are each collected and sorted by one pass; a
    bin of one repeated value over budget is ranked from its counts, and a
    bin of several values over budget is ranked the same way, recursively
    (its bins are BINS times narrower, so this ends within a few levels).
    The bin of a value is the same function of it in every pass.
    """
    scale = BINS / (high - low)

    def bins(d: Tensor) -> Tensor:
        return ((d - low) * scale).to(torch.int64).clamp_(0, BINS - 1)

    total = torch.zeros(BINS, dtype=torch.int64, device=u.device)
    in_class = torch.zeros_like(total)
    least = torch.full((BINS,), math.inf, dtype=u.dtype, device=u.device)
    most = torch.full((BINS,), -math.inf, dtype=u.dtype, device=u.device)
    for got, one_class in _taken(u, y, step, select):
        where = bins(got)
        total += torch.bincount(where, minlength=BINS)
        in_class += torch.bincount(where[one_class], minlength=BINS)
        least.scatter_reduce_(0, where, got, "amin")
        most.scatter_reduce_(0, where, got, "amax")
    counts, one_class_counts = total.tolist(), in_class.tolist()
    lows, highs = least.tolist(), most.tolist()

    def run_of(first: int, end: int) -> Callable[[Tensor], Tensor]:
        def inside(d: Tensor) -> Tensor:
            where = bins(d)
            return (where >= first) & (where < end)

        return _both(select, inside)

    run, first = 0, 0
    for b, c in enumerate(counts + [budget + 1]):  # a sentinel over budget ends the last run
        if run and run + c > budget:
            _collect(u, y, step, run_of(first, b), run, before, ranks)
            before += run
            run = 0
        if b == BINS:
            break
        if c > budget:
            if lows[b] == highs[b]:  # c equal values: positions before+1 .. before+c
                ranks.twice_in_class += one_class_counts[b] * (2 * before + c + 1)
                ranks.ties += float(c) ** 3 - c
            else:
                _rank_bins(u, y, step, budget, run_of(b, b + 1), lows[b], highs[b], before, ranks)
            before += c
        elif c:
            if not run:
                first = b
            run += c


def _rank_sums(u: Tensor, y: Tensor, step: int, budget: int) -> _Ranks:
    """The ranks of the dissimilarities of all N (N - 1) / 2 pairs i < j of the unit rows u [N, k]:
    one pass and one sort when they fit in ``budget``, else by bins (``_rank_bins``)."""
    n = u.shape[0]
    total = n * (n - 1) // 2
    ranks = _Ranks()
    if total <= budget:
        _collect(u, y, step, None, total, 0, ranks)
    else:
        _rank_bins(u, y, step, budget, None, 0.0, 2.0, 0, ranks)
    return ranks


def _spearman(twice_ranks: int, ties: float, total: int, same: int) -> float:
    """Spearman correlation of the dissimilarities with the label dissimilarity (0 for one class, more
    otherwise), over ``total`` pairs of which ``same`` are of one class: the Pearson correlation of the
    average ranks with the pair's class indicator, in exact integers up to the last division."""
    numerator = same * (total + 1) - twice_ranks  # 2 (sum of ranks of the other pairs - their expectation)
    spread = total * (total * total - 1) - ties  # 12 N' var(ranks)
    if spread <= 0:  # every dissimilarity equal: no ordering to correlate
        return 0.0
    rho = numerator * math.sqrt(3.0 * total) / math.sqrt(spread * same * (total - same))
    return min(1.0, max(-1.0, rho))


def parc(
    features: Any,
    labels: Any,
    *,
    n_dims: Optional[int] = 32,
    pca: str = "exact",
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    block_size: Optional[int] = None,
    pairs_per_pass: Optional[int] = None,
) -> Tensor:
    """PARC (Bolya et al., NeurIPS 2021), as TencentARC/SFDA's ``PARC_Score`` computes it.

    The features are reduced to their ``n_dims`` leading principal
    components, each standardised to unit variance; the dissimilarity of two
    samples is 1 - the Pearson correlation of their reduced rows, and that of
    their labels 1 - the correlation of their one-hot rows (0 within a class,
    C / (C - 1) across). The score is 100 x the Spearman rank correlation of
    the two over all N (N - 1) / 2 pairs, ties at their average rank.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids (any ids: only which samples share one matters).
        n_dims: principal components kept (default 32, as published), at most
            min(N, D); None: no reduction, the features' own columns are
            standardised (constant ones are 0).
        pca: "exact" (default): the leading components of an SVD of the
            centred features. "randomized": scikit-learn's randomized PCA with
            the published settings (seed 1919, one power iteration): it
            reproduces the published numbers, and the error of that
            approximation they carry (1.5% of the score on 500 x 200
            Gaussian features; worse for ill-conditioned features, whose
            small components it returns as round-off).
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).
        block_size: rows of one block of the N x N correlations (default:
            the package's chunk size, at least 256 rows on the CPU).
        pairs_per_pass: pair values one ranking pass holds (default 2**24 on
            the CPU, 2**26 elsewhere; about 34 bytes each in float64). All
            N (N - 1) / 2 fit in one pass when at most this many; otherwise
            one counting pass and about N (N - 1) / (2 pairs_per_pass) more.

    Returns:
        0-dim tensor in [-100, 100]; larger is better.

    The sign of each principal component follows scikit-learn (the largest
    |loading| positive); the score depends on it, as the correlation of two
    rows does. Components whose singular value is round-off (features of
    rank below n_dims, or N <= n_dims) are zero columns, not round-off
    standardised to unit variance; a sample whose reduced row is constant
    correlates 0 with every other (the published code gives NaN).

    Raises:
        ValueError: for fewer than two classes, or no two samples of one
            class (the label dissimilarities are then all equal).
    """
    options = compute_options(dtype=dtype, device=device)
    dtype = options.dtype
    n_dims = positive_int(n_dims, "n_dims", optional=True)
    pca = one_of(pca, "pca", PCA_SOLVERS)
    block_size = positive_int(block_size, "block_size", optional=True)
    pairs_per_pass = positive_int(pairs_per_pass, "pairs_per_pass", optional=True)
    inputs = prepare(features, labels, regression=False, num_classes=None, device=options.device)
    f, y = inputs.features, inputs.targets
    n = inputs.num_samples
    with torch.no_grad():
        counts = torch.unique(y, return_counts=True)[1]  # the classes present, whatever their ids
        classes, same = counts.numel(), int((counts * (counts - 1) // 2).sum())
        if classes < 2:
            raise ValueError(f"PARC needs at least two classes, got {classes}: the label dissimilarities are all 0")
        if same == 0:
            raise ValueError(
                "PARC needs two samples of one class at least: every class has one sample, so the label "
                "dissimilarities are all equal"
            )
        step = block_size or chunk_length(n, n, dtype, f.device)
        budget = pairs_per_pass or (CPU_PAIRS if f.device.type == "cpu" else DEVICE_PAIRS)
        frame = make_frame(f, dtype, per_column=False, power=2, centre=True, largest=inputs.magnitude)
        u = _unit_rows(_reduced(f, frame, n_dims, pca, dtype))
        ranks = _rank_sums(u, y, step, budget)
        rho = _spearman(ranks.twice_in_class, ranks.ties, n * (n - 1) // 2, same)
        return torch.tensor(100.0 * rho, dtype=dtype, device=f.device)
