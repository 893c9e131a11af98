"""Sufficient statistics of LogME: sums over samples (docs/design.md, section 3).

The evidence depends on the data only through G = F^T F, the per-column sums
F^T Y, y^T y per column and N. Each is a sum over samples, so it can be
accumulated batch by batch and summed across processes; they are kept about
a shift near the mean, which F^T F is rebuilt from without cancellation.
Features are converted to the compute dtype one row chunk at a time, so a
float32 F is never copied whole to float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

#: A column whose variance (its centred second moment) is at most this many eps
#: of its second moment about the shift is constant: the variance is round-off.
CONSTANT_COLUMN_EPS = 64

# Bytes of one converted chunk: large enough for efficient matmuls, small
# enough that the extra peak memory stays far below a float64 copy of F.
CHUNK_BYTES = 64 << 20


# On CPU, accumulate only the upper triangle of the Gram matrix, a block row
# at a time: (blocks + 1) / (2 blocks) of the flops of a full product (torch
# has no syrk), and the eigendecompositions read only that triangle. On GPUs
# one full product is faster than several launches.
GRAM_BLOCKS = 4
_MIN_BLOCKED_DIM = 256


def add_gram_(gram: Tensor, chunk: Tensor) -> None:
    """Add chunk^T chunk to gram [D, D] for chunk [B, D]; the upper triangle is exact.

    On CPU (D >= 256) the strictly lower triangle is left untouched, so
    callers read gram through its upper triangle only (eigh(..., UPLO="U")).
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


def add_rows_(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """out[index[i]] += rows[i] for out [C, ...], int64 index [B], rows [B, ...]; returns out.

    On CPU index_put_(accumulate=True) runs 3-5x faster than index_add_ for
    rows of many values (measured at 20000 x 1024); on GPUs index_add_'s
    atomics avoid index_put_'s sort.
    """
    if out.device.type == "cpu":
        return out.index_put_((index,), rows, accumulate=True)
    return out.index_add_(0, index, rows)


def _chunk_len(total: int, other: int, dtype: torch.dtype) -> int:
    per_item = other * torch.empty((), dtype=dtype).element_size()
    return max(1, min(total, CHUNK_BYTES // max(per_item, 1)))


def row_chunks(
    features: Tensor, dtype: torch.dtype, shift: Optional[Tensor] = None
) -> Iterator[Tuple[slice, Tensor]]:
    """Yield (rows, features[rows] in ``dtype`` minus ``shift`` [D]) for features [N, D].

    Already in ``dtype`` and no shift: one chunk, no copy. Otherwise chunks
    of about CHUNK_BYTES, so that the converted copy never holds all of F.
    """
    n, d = features.shape
    if features.dtype == dtype and shift is None:
        yield slice(0, n), features
        return
    step = _chunk_len(n, d, dtype)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        yield rows, _shifted(features[rows], dtype, shift)


def _shifted(rows: Tensor, dtype: torch.dtype, shift: Optional[Tensor]) -> Tensor:
    """rows [B, D] in ``dtype`` minus ``shift`` [D] (integer rows: see ``int_shifted``)."""
    if shift is None:
        return rows.to(dtype)
    if rows.is_floating_point():
        return rows.to(dtype) - shift
    return int_shifted(rows.to(torch.int64), shift.to(torch.float64)).to(dtype)


def int_shifted(rows: Tensor, shift: Tensor) -> Tensor:
    """int64 rows [B, D] minus a float64 shift [D], in float64.

    The shift's integer part is subtracted in int64 first: values near 2**62
    differ in digits float64 cannot hold, but their differences it holds.
    Where that difference would wrap around (a column spanning more than
    2**63) the float64 difference is taken instead.
    """
    whole = shift.round().clamp(-(2.0 ** 62), 2.0 ** 62)
    whole_int = whole.to(torch.int64)
    diff = rows - whole_int
    wrapped = (rows >= whole_int) != (diff >= 0)
    exact = diff.to(torch.float64) - (shift - whole)
    return torch.where(wrapped, rows.to(torch.float64) - shift, exact)


def column_chunks(features: Tensor, dtype: torch.dtype) -> Iterator[Tuple[slice, Tensor]]:
    """Yield (cols, features[:, cols] in ``dtype``) for features [N, D]; see row_chunks."""
    n, d = features.shape
    if features.dtype == dtype:
        yield slice(0, d), features
        return
    step = _chunk_len(d, n, dtype)
    for start in range(0, d, step):
        cols = slice(start, min(start + step, d))
        yield cols, features[:, cols].to(dtype)


@dataclass
class SufficientStatistics:
    """Sums over samples that determine the LogME evidence, about a shift.

    Every sum is of x = f - shift, not of the features f themselves: with a
    shift near the mean, F^T F can be rebuilt from a centred second moment
    and the mean, so features far from 0 compared with their spread lose no
    digits to cancellation (see ``centred`` and ``spectrum.primal``). The
    shift is set from the first batch and any other one is exact too
    (``recentred_by``).

    gram: [D, D] sum of x x^T; only its upper triangle is authoritative (see add_gram_).
    feature_sum: [D] sum of x.
    cross: [C, D] row c is sum_i y_ic x_i (for classification, the sum of
        the shifted feature rows of class c).
    target_sum: [C] sum of y_c (for classification, the class counts).
    target_sq: [C] y_c^T y_c (for classification, the class counts).
    num_samples: N.
    shift: [D] what was subtracted from every feature row, or None before
        the first batch.
    """

    gram: Tensor
    feature_sum: Tensor
    cross: Tensor
    target_sum: Tensor
    target_sq: Tensor
    num_samples: int
    shift: Optional[Tensor] = None

    @classmethod
    def zeros(
        cls, num_features: int, num_columns: int, *, dtype: torch.dtype, device: torch.device
    ) -> "SufficientStatistics":
        kw: Dict[str, Any] = dict(dtype=dtype, device=device)
        return cls(
            torch.zeros(num_features, num_features, **kw),
            torch.zeros(num_features, **kw),
            torch.zeros(num_columns, num_features, **kw),
            torch.zeros(num_columns, **kw),
            torch.zeros(num_columns, **kw),
            0,
        )

    def add_(
        self, features: Tensor, targets: Tensor, classification: bool, *, shift: bool = True
    ) -> "SufficientStatistics":
        """Add a batch in place: features [B, D]; int64 labels [B] or targets [B, C].

        The first batch sets the shift to its own mean (a later batch's
        shift would be as exact; one near the data is what keeps digits).
        ``shift=False`` keeps sums with no shift, when none was set yet.
        """
        dtype = self.gram.dtype
        if self.shift is None and shift:
            self.shift = features.sum(0, dtype=dtype) / max(features.shape[0], 1)
        for rows, chunk in row_chunks(features, dtype, self.shift):
            add_gram_(self.gram, chunk)
            self.feature_sum.add_(chunk.sum(0))
            y = targets[rows]
            if classification:
                add_rows_(self.cross, y, chunk)
                # index_add_ rather than bincount: bincount must read the
                # largest label back to the host to size its output.
                ones = torch.ones_like(y, dtype=dtype)
                self.target_sq.index_add_(0, y, ones)
                self.target_sum.index_add_(0, y, ones)
            else:
                y = y.to(dtype)
                self.cross.addmm_(y.T, chunk)
                self.target_sq.add_((y * y).sum(0))
                self.target_sum.add_(y.sum(0))
        self.num_samples += features.shape[0]
        return self

    def recentred_by(self, delta: Tensor) -> "SufficientStatistics":
        """The sums of x + delta [D] instead of x, as new tensors (exact algebra, no data)."""
        s1, n = self.feature_sum, self.num_samples
        gram = self.gram + torch.outer(s1, delta) + torch.outer(delta, s1) + n * torch.outer(delta, delta)
        shift = None if self.shift is None else self.shift - delta
        return SufficientStatistics(
            gram, s1 + n * delta, self.cross + torch.outer(self.target_sum, delta),
            self.target_sum, self.target_sq, n, shift,
        )

    def to(self, dtype: torch.dtype) -> "SufficientStatistics":
        """The same sums in another dtype (new tensors)."""
        return SufficientStatistics(
            self.gram.to(dtype), self.feature_sum.to(dtype), self.cross.to(dtype), self.target_sum.to(dtype),
            self.target_sq.to(dtype), self.num_samples, None if self.shift is None else self.shift.to(dtype),
        )

    def mean(self) -> Tensor:
        """Feature mean [D]."""
        shift = self.shift if self.shift is not None else torch.zeros_like(self.feature_sum)
        return shift + self.feature_sum / max(self.num_samples, 1)

    def centred(self) -> Tuple[Tensor, Tensor]:
        """(sum (f - mu)(f - mu)^T [D, D] symmetric, mean mu [D]), mu the feature mean.

        The sums are about a shift near mu, so the rank-one correction is
        small: the centred moment keeps every digit of the spread.
        """
        n = max(self.num_samples, 1)
        s1 = self.feature_sum
        centred = symmetric(self.gram) - torch.outer(s1, s1) / n
        return centred, self.mean()

    def raw_gram(self) -> Tensor:
        """F^T F [D, D] of the features themselves, symmetric."""
        if self.shift is None:
            return symmetric(self.gram)
        centred, mu = self.centred()
        return centred + self.num_samples * torch.outer(mu, mu)

    def raw_cross(self) -> Tensor:
        """[C, D]: F^T y_c of the features themselves."""
        if self.shift is None:
            return self.cross
        return self.cross + torch.outer(self.target_sum, self.shift)


def symmetric(gram: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle ``gram`` [D, D] holds (see add_gram_)."""
    return torch.triu(gram) + torch.triu(gram, 1).T


def compute_statistics(
    features: Tensor, targets: Tensor, num_columns: int, classification: bool, dtype: torch.dtype,
    *, about_mean: bool = True,
) -> SufficientStatistics:
    """Statistics of a whole data set: features [N, D], labels [N] or targets [N, C].

    ``about_mean=True`` sums about the data mean (what the precise route
    needs); ``False`` sums the features themselves (no shift): one pass
    and no converted copy when they are already in ``dtype``, which is all
    the fast route needs, since it decomposes F^T F itself.
    """
    stats = SufficientStatistics.zeros(
        features.shape[1], num_columns, dtype=dtype, device=features.device
    )
    if about_mean:
        stats.shift = features.sum(0, dtype=dtype) / features.shape[0]
    return stats.add_(features, targets, classification, shift=about_mean)
