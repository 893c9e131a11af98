"""Numeric primitives that every score builds its sums and formulas from.

One home for the small operations that the scores share, each written once
with its device policy and its guard against zeros:

* chunking: ``row_chunks`` (the one row chunker, one documented policy per
  device) and ``column_chunks`` (the dual route's kernel);
* per-class sums: ``add_counts_`` / ``class_counts`` (samples per class)
  and ``add_rows_`` / ``class_sums`` (rows summed per class);
* a Gram matrix stored by its upper triangle: ``add_gram_`` fills it,
  ``gram_full`` and ``gram_eigh`` read it, so no caller needs to know which
  triangle holds the numbers;
* guarded division: ``safe_divide``, ``safe_reciprocal``, ``safe_rsqrt``
  and ``pinv_diagonal`` (0 wherever the divisor is dropped, never a NaN or
  an Inf from a division by 0).

Nothing here knows about a score: ``sums`` (LogME's sufficient statistics),
``scores``, ``spectrum`` and the accumulators import from here, never the
other way round.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "CHUNK_BYTES",
    "CPU_CHUNK_BYTES",
    "CPU_CHUNK_ROWS",
    "itemsize",
    "chunk_length",
    "row_chunks",
    "column_chunks",
    "add_counts_",
    "class_counts",
    "add_rows_",
    "class_sums",
    "present_classes",
    "ClassBlock",
    "class_blocks",
    "add_gram_",
    "gram_full",
    "gram_eigh",
    "safe_divide",
    "safe_reciprocal",
    "safe_rsqrt",
    "pinv_diagonal",
]

# -- chunks ------------------------------------------------------------------------

#: Bytes of one converted chunk off the CPU: few launches, and the extra peak
#: memory stays far below a float64 copy of the features.
CHUNK_BYTES = 64 << 20
#: Bytes of one converted row chunk on the CPU, with at least CPU_CHUNK_ROWS
#: rows (see ``chunk_length``).
CPU_CHUNK_BYTES = 8 << 20
CPU_CHUNK_ROWS = 256


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def chunk_length(total: int, other: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk of ``total`` rows of ``other`` values each in ``dtype``, on ``device``.

    Off the CPU, chunks of CHUNK_BYTES: every chunk costs a few launches.
    On the CPU, chunks of CPU_CHUNK_BYTES: their temporaries come back from
    the allocator's cache instead of fresh, page-faulting memory, which made
    element-wise passes 1.2-1.8x and Gram updates 1.0-1.4x faster on a
    2-core machine (benchmarked against CHUNK_BYTES at N x D = 200000 x 64,
    60000 x 256, 20000 x 1024). Far smaller chunks lose again to the
    per-operation cost of OpenMP, and at least CPU_CHUNK_ROWS rows keep
    every Gram update a matrix product however wide the rows.
    """
    row_bytes = max(1, other * itemsize(dtype))
    if device.type == "cpu":
        step = max(CPU_CHUNK_ROWS, CPU_CHUNK_BYTES // row_bytes)
    else:
        step = CHUNK_BYTES // row_bytes
    return max(1, min(total, step))


def row_chunks(
    features: Tensor,
    dtype: torch.dtype,
    convert: Optional[Callable[[Tensor], Tensor]] = None,
    *,
    whole_if_same: bool = False,
) -> Iterator[Tuple[slice, Tensor]]:
    """Yield (rows, ``convert(features[rows])``) for features [N, D], chunk by chunk.

    The one row chunker of the package: chunks of ``chunk_length`` rows, so
    that a converted copy (a float32 F in float64, shifted rows) never
    holds all of F. Chunk boundaries only reorder the sums over samples.

    Args:
        features: [N, D] on any device.
        dtype: the dtype of the yielded chunks, which sizes them.
        convert: rows [B, D] to the chunk [B, D] in ``dtype`` (a shift, a
            scale); by default ``rows.to(dtype)``, a view when already in it.
        whole_if_same: with no ``convert`` and features already in
            ``dtype``, yield all N rows at once, uncopied: for passes whose
            only large operand is the chunk itself (products into a sum of
            fixed size), where chunks would only reorder the sums.
    """
    n, d = features.shape
    if whole_if_same and convert is None and features.dtype == dtype:
        yield slice(0, n), features
        return
    step = chunk_length(n, d, dtype, features.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        part = features[rows]
        yield rows, part.to(dtype) if convert is None else convert(part)


def column_chunks(features: Tensor, dtype: torch.dtype) -> Iterator[Tuple[slice, Tensor]]:
    """Yield (cols, features[:, cols] in ``dtype``) for features [N, D]; one chunk, uncopied, if already in it.

    Chunks of CHUNK_BYTES on every device: their only consumers are matrix
    products (the dual route's F F^T and U^T F), which the CPU's smaller
    row chunks do not speed up.
    """
    n, d = features.shape
    if features.dtype == dtype:
        yield slice(0, d), features
        return
    step = max(1, min(d, CHUNK_BYTES // max(1, n * itemsize(dtype))))
    for start in range(0, d, step):
        cols = slice(start, min(start + step, d))
        yield cols, features[:, cols].to(dtype)


# -- per-class sums ----------------------------------------------------------------


def add_counts_(out: Tensor, index: Tensor) -> Tensor:
    """out[index[i]] += 1 for out [C] and int64 index [B]; returns out.

    index_add_ rather than bincount: bincount reads the largest index back
    to the host to size its output, a sync per batch on a GPU.
    """
    return out.index_add_(0, index, torch.ones_like(index, dtype=out.dtype))


def class_counts(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """[C] samples per class of int64 labels [N] in 0..num_classes-1, in ``dtype``."""
    return add_counts_(torch.zeros(num_classes, dtype=dtype, device=labels.device), labels)


def add_rows_(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """out[index[i]] += rows[i] for out [C, ...], int64 index [B], rows [B, ...]; returns out.

    On CPU index_put_(accumulate=True) runs 3-5x faster than index_add_ for
    rows of many values (measured at 20000 x 1024); on GPUs index_add_'s
    atomics avoid index_put_'s sort.
    """
    if out.device.type == "cpu":
        return out.index_put_((index,), rows, accumulate=True)
    return out.index_add_(0, index, rows)


def class_sums(rows: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[C, K]: the sum of the rows [N, K] of each class of int64 labels [N], in rows' dtype."""
    out = torch.zeros(num_classes, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return add_rows_(out, labels, rows)


def present_classes(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(ids [N] in 0..K-1, counts [K] in ``dtype``): int64 labels [N] renumbered over the K classes that occur.

    For scores that fit a classifier to the classes present: an absent id
    has no mean, prior or prediction. Ids keep their order.
    """
    counts = class_counts(labels, num_classes, dtype)
    present = counts > 0
    new_id = torch.cumsum(present.to(torch.int64), 0) - 1
    return new_id[labels], counts[present]


# -- Gram matrices, stored by their upper triangle ---------------------------------

# On CPU, accumulate only the upper triangle of the Gram matrix, a block row
# at a time: (blocks + 1) / (2 blocks) of the flops of a full product (torch
# has no syrk). On GPUs one full product is faster than several launches.
GRAM_BLOCKS = 4
_MIN_BLOCKED_DIM = 256


@dataclass
class ClassBlock:
    """A run of classes, in order of size, whose rows are gathered together (see ``class_blocks``).

    ids: the class ids, smallest class first.
    order: [N] sample indices ordered by class, classes ordered by size (shared by all blocks).
    starts: [B] where each class's samples begin in ``order``.
    sizes: [B] samples per class.
    largest: the samples of the block's largest class.
    """

    ids: List[int]
    order: Tensor
    starts: Tensor
    sizes: Tensor
    largest: int

    def windows(self, window: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Per window of ``window`` rows of every class: (valid slots [B, window], their sample indices [M]).

        Rows go to a zero-padded [B, window, ...] tensor at ``valid``; a class
        shorter than the window leaves zero rows.
        """
        for offset in range(0, self.largest, window):
            j = offset + torch.arange(window, device=self.order.device)
            valid = j[None, :] < self.sizes[:, None]
            yield valid, self.order[(self.starts[:, None] + j[None, :])[valid]]


def class_blocks(
    labels: Tensor, counts_host: List[int], cost: Callable[[int, int], int], budget: int
) -> Iterator[ClassBlock]:
    """The classes with samples in blocks whose temporaries fit ``budget`` bytes, in order of class size.

    Args:
        labels: [N] class ids 0..C-1.
        counts_host: the C class sizes, on the host.
        cost: (classes in the block, samples of its largest class) -> bytes.
        budget: the bytes one block may take (a block has one class at least).

    Classes taken in order of size pad to a similar size within a block;
    the blocks are a loop over data, not over classes.
    """
    device = labels.device
    by_size = sorted(range(len(counts_host)), key=counts_host.__getitem__)
    sizes = [counts_host[c] for c in by_size]
    # Samples ordered by class, classes ordered by size: a block is a run of rows.
    rank = torch.empty(len(by_size), dtype=torch.int64)
    rank[torch.tensor(by_size, dtype=torch.int64)] = torch.arange(len(by_size))
    order = torch.argsort(rank.to(device)[labels], stable=True)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    b = bisect.bisect_right(sizes, 0)  # classes without samples have no rows
    while b < len(sizes):
        # The longest run of classes from b whose block fits the budget (at least one).
        lo, hi = b + 1, len(sizes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid - b, sizes[mid - 1]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        yield ClassBlock(
            by_size[b:lo], order, torch.tensor(starts[b:lo], dtype=torch.int64, device=device),
            torch.tensor(sizes[b:lo], dtype=torch.int64, device=device), sizes[lo - 1],
        )
        b = lo


def add_gram_(gram: Tensor, chunk: Tensor) -> None:
    """Add chunk^T chunk [D, D] to gram [D, D] for chunk [B, D]; only the upper triangle is exact.

    On CPU (D >= 256) the strictly lower triangle is left untouched: read
    ``gram`` through ``gram_full``, ``gram_eigh`` or its diagonal, never
    directly. Adding other sums (merging, exact shifts) keeps that valid,
    as the upper triangle of a sum is the sum of the upper triangles.
    """
    d = chunk.shape[1]
    if chunk.device.type != "cpu" or d < _MIN_BLOCKED_DIM:
        gram.addmm_(chunk.T, chunk)
        return
    step = -(-d // GRAM_BLOCKS)
    for start in range(0, d, step):
        stop = min(start + step, d)
        # Block row start:stop, from the diagonal rightwards, written in place.
        gram[start:stop, start:].addmm_(chunk[:, start:stop].T, chunk[:, start:])


def gram_full(gram: Tensor) -> Tensor:
    """The symmetric matrix [D, D] whose upper triangle ``gram`` [D, D] holds (a new tensor)."""
    return torch.triu(gram) + torch.triu(gram, 1).T


def gram_eigh(gram: Tensor) -> Tuple[Tensor, Tensor]:
    """(eigenvalues [D] ascending, eigenvectors [D, D] as columns) of the Gram matrix ``gram`` [D, D] holds.

    Reads the upper triangle only, so it needs no symmetric copy.
    """
    return torch.linalg.eigh(gram, UPLO="U")


# -- guarded division --------------------------------------------------------------


def safe_divide(numerator: Union[Tensor, float], denominator: Tensor, keep: Tensor) -> Tensor:
    """numerator / denominator where ``keep``, 0 elsewhere (broadcast).

    The dropped denominators are replaced by 1 before dividing, so a 0 there
    makes neither an Inf nor a NaN (nor a NaN gradient through the where).
    """
    divisor = torch.where(keep, denominator, torch.ones_like(denominator))
    quotient = numerator / divisor
    return torch.where(keep, quotient, torch.zeros_like(quotient))


def safe_reciprocal(values: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """1 / values where ``keep`` (default: values > 0), 0 elsewhere: the inverse of a count or a weight."""
    return safe_divide(1.0, values, values > 0 if keep is None else keep)


def safe_rsqrt(values: Tensor, keep: Tensor) -> Tensor:
    """1 / sqrt(values) where ``keep``, 0 elsewhere: a standardisation that zeroes dropped columns."""
    root = torch.where(keep, values, torch.ones_like(values)).rsqrt()
    return torch.where(keep, root, torch.zeros_like(root))


def pinv_diagonal(values: Tensor, rcond: float) -> Tensor:
    """[K]: the pseudo-inverse of diag(values [K]): 1 / values above rcond * max(values), else 0."""
    cutoff = rcond * values.amax().clamp_min(torch.finfo(values.dtype).tiny)
    return safe_reciprocal(values, values > cutoff)
