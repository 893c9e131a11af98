"""Leave-one-out k-nearest-neighbour accuracy of features for class labels.

Each sample is classified by a majority vote of the labels of its k nearest
other samples, and the score is the fraction classified correctly
(transformer-ranker's ``NearestNeighbors`` estimator; for more than two
classes its micro-F1 is this accuracy).

The N x N distances are computed in square tiles of ``block_size`` rows and
columns, and each row keeps only its k best candidates between tiles, so
memory is O(block_size^2 + block_size * D + N * k) whatever N. Ties are
broken deterministically: among equally distant candidates the lower sample
index is nearer, and among equally voted classes the lower class id wins.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import prepare
from ._options import compute_options
from ._validators import boolean, one_of, positive_int
from .scores import SCALE_LIMIT, pow2_scale, scale_band, work_dtype

__all__ = ["knn", "METRICS"]

Device = Union[str, torch.device, None]

#: The distances ``knn`` takes, as transformer-ranker names them.
METRICS = ("euclidean", "cosine")

#: Rows (and columns) of one distance tile by default: 8 MiB of float64 on the
#: CPU, 128 MiB on other devices, where fewer and larger launches pay.
CPU_BLOCK = 1024
DEVICE_BLOCK = 4096


def _frame(f: Tensor, dtype: torch.dtype, metric: str, magnitude: float) -> Tuple[Optional[Tensor], Tensor]:
    """(origin [D] or None, a power-of-two scale []) of features f [N, D], in the work dtype.

    Euclidean distances do not change with a shift, so rows are taken about
    the first sample: that removes an offset (features + 1e6) exactly and,
    unlike the mean, keeps integer-valued features integer-valued, so that
    equal distances stay exactly equal and the lower-index rule decides
    them. Cosine similarity is not shift-invariant: rows are used as given.
    Either way the scale (exact) keeps squared norms within range.
    """
    work = work_dtype(f.dtype, dtype)
    origin = f[0].to(work) if metric == "euclidean" else None
    size = torch.tensor([2.0 * magnitude if origin is not None else magnitude], dtype=torch.float64)
    scale = pow2_scale(size, scale_band(dtype, 2), SCALE_LIMIT[work])[0]
    return origin, scale.to(device=f.device, dtype=work)


def _converted(rows: Tensor, origin: Optional[Tensor], scale: Tensor, dtype: torch.dtype, metric: str) -> Tensor:
    """Rows [B, D] ready for products in ``dtype``: shifted and scaled (euclidean) or unit rows (cosine)."""
    x = rows.to(scale.dtype)
    if origin is not None:
        x = x - origin
    x = (x * scale).to(dtype)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        # A zero row has similarity 0 with every row, as in torch's cosine_similarity.
        x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    return x


def _nearest(values: Tensor, index: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k smallest ``values`` [B, W] of each row with their ``index`` [B, W]: smallest (value, index) pairs.

    A top-k of values alone settles every row whose k-th and (k+1)-th
    smallest values differ; only the rows with a tie across that cut (rare
    but for duplicated or quantised features) pick their tied candidates by
    index. The k smallest of a union are the k smallest of the parts' k
    smallest, so tiles can be reduced one at a time and merged.
    """
    width = values.shape[1]
    if width <= k:
        return values, index
    top = values.topk(k + 1, dim=1, largest=False)
    chosen = top.indices[:, :k]
    cut = top.values[:, k - 1]
    crossing = cut == top.values[:, k]
    if bool(crossing.any()):
        rows = crossing.nonzero()[:, 0]
        v, i, kth = values[rows], index[rows], cut[rows, None]
        below, tied = v < kth, v == kth
        room = k - below.sum(1, keepdim=True)
        # The room-th smallest index among the tied candidates, and the tied ones up to it.
        last = torch.where(tied, i, torch.full_like(i, torch.iinfo(i.dtype).max)).sort(1).values.gather(1, room - 1)
        take = below | (tied & (i <= last))
        chosen = chosen.clone()
        chosen[rows] = take.nonzero()[:, 1].view(-1, k)
    return values.gather(1, chosen), index.gather(1, chosen)


def _vote(neighbour_labels: Tensor) -> Tensor:
    """[B]: the most frequent label of each row of ``neighbour_labels`` [B, k], the lowest on a tie."""
    votes = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]).sum(2)  # [B, k]: each one's count
    top = votes == votes.amax(1, keepdim=True)
    high = torch.iinfo(neighbour_labels.dtype).max
    return torch.where(top, neighbour_labels, torch.full_like(neighbour_labels, high)).amin(1)


def knn(
    features: Any,
    labels: Any,
    *,
    k: int = 3,
    metric: str = "euclidean",
    binary_f1: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    block_size: Optional[int] = None,
) -> Tensor:
    """Leave-one-out k-nearest-neighbour accuracy (transformer-ranker's kNN estimator).

    Every sample's k nearest other samples vote with their labels (the most
    frequent label wins; on a tie, the lowest class id, as ``torch.mode``
    does in the published code); the score is the fraction of samples whose
    vote is their own label. A sample never counts as its own neighbour; its
    duplicates do (at distance 0).

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        k: neighbours per sample (default 3, as published); N must exceed k.
        metric: "euclidean" (default, as published) or "cosine" (1 - cosine
            similarity; a zero row has similarity 0 with every row).
        binary_f1: with exactly two classes present, return the F1 score of
            the class with the larger id instead of the accuracy. The
            published code does this for two classes (torchmetrics' binary F1
            of class 1 of 0/1 labels) and returns micro-F1 = accuracy for
            more, so its scale changes with the class count; accuracy (the
            default) is one measure for every task.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).
        block_size: rows and columns of one distance tile (default 1024 on
            the CPU, 4096 elsewhere); memory is O(block_size^2).

    Returns:
        0-dim tensor in [0, 1]; larger is better. 1 for a single class.
        Distances that are exactly equal go to the lower sample index
        (the published ``topk`` leaves that order unspecified).
    """
    options = compute_options(dtype=dtype, device=device)
    dtype = options.dtype
    k = positive_int(k, "k")  # type: ignore[assignment]
    metric = one_of(metric, "metric", METRICS)
    binary_f1 = boolean(binary_f1, "binary_f1")
    block_size = positive_int(block_size, "block_size", optional=True)
    inputs = prepare(features, labels, regression=False, num_classes=None, device=options.device)
    f, y = inputs.features, inputs.targets
    n = inputs.num_samples
    if n <= k:
        raise ValueError(f"knn: k={k} neighbours need at least k + 1 = {k + 1} samples, got N = {n}")
    step = block_size or (CPU_BLOCK if f.device.type == "cpu" else DEVICE_BLOCK)
    with torch.no_grad():
        magnitude = inputs.magnitude if inputs.magnitude is not None else float(f.abs().amax())
        origin, scale = _frame(f, dtype, metric, magnitude)

        def tile(rows: slice) -> Tensor:
            return _converted(f[rows], origin, scale, dtype, metric)

        predictions = torch.empty_like(y)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            xi = tile(rows)
            best = torch.empty(xi.shape[0], 0, dtype=dtype, device=f.device)
            best_index = torch.empty(xi.shape[0], 0, dtype=torch.int64, device=f.device)
            for other in range(0, n, step):
                cols = slice(other, min(other + step, n))
                xj = xi if other == start else tile(cols)
                if metric == "euclidean":
                    # ||x_i - x_j||^2 less ||x_i||^2, which is the same for the whole row.
                    key = torch.addmm((xj * xj).sum(1)[None, :], xi, xj.T, alpha=-2.0)
                else:
                    key = -(xi @ xj.T)
                if other == start:
                    key.fill_diagonal_(float("inf"))  # a sample is not its own neighbour
                index = torch.arange(cols.start, cols.stop, device=f.device).expand(xi.shape[0], -1)
                near, near_index = _nearest(key, index, k)
                best, best_index = _nearest(torch.cat([best, near], 1), torch.cat([best_index, near_index], 1), k)
            predictions[rows] = _vote(y[best_index])
        correct = predictions == y
        if binary_f1:
            present = torch.unique(y)
            if present.numel() == 2:
                positive = present[1]
                hits = 2 * (correct & (y == positive)).sum().to(dtype)
                wrong = (~correct).sum().to(dtype)  # each error is a false positive or negative of the positive class
                return hits / (hits + wrong)
        return correct.sum().to(dtype) / n
