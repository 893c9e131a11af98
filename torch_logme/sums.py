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
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._primitives import add_counts_, add_gram_, add_rows_, gram_full, row_chunks

#: A column whose variance (its centred second moment) is at most this many eps
#: of its second moment about the shift is constant: the variance is round-off.
CONSTANT_COLUMN_EPS = 64


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


@dataclass
class SufficientStatistics:
    """Sums over samples that determine the LogME evidence, about a shift.

    Every sum is of x = f - shift, not of the features f themselves: with a
    shift near the mean, F^T F can be rebuilt from a centred second moment
    and the mean, so features far from 0 compared with their spread lose no
    digits to cancellation (see ``centred`` and ``spectrum.primal``). The
    shift is set from the first batch and any other one is exact too
    (``recentred_by``).

    gram: [D, D] sum of x x^T, stored by its upper triangle: read it through
        ``gram_full`` or ``gram_eigh`` (``_primitives``), or its diagonal.
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
        convert = None if self.shift is None else partial(_shifted, dtype=dtype, shift=self.shift)
        # Chunks only bound a converted copy: unshifted features already in dtype go in whole.
        for rows, chunk in row_chunks(features, dtype, convert, whole_if_same=True):
            add_gram_(self.gram, chunk)
            self.feature_sum.add_(chunk.sum(0))
            y = targets[rows]
            if classification:
                add_rows_(self.cross, y, chunk)
                add_counts_(self.target_sq, y)
                add_counts_(self.target_sum, y)
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
        centred = gram_full(self.gram) - torch.outer(s1, s1) / n
        return centred, self.mean()

    def raw_gram(self) -> Tensor:
        """F^T F [D, D] of the features themselves, symmetric."""
        if self.shift is None:
            return gram_full(self.gram)
        centred, mu = self.centred()
        return centred + self.num_samples * torch.outer(mu, mu)

    def raw_cross(self) -> Tensor:
        """[C, D]: F^T y_c of the features themselves."""
        if self.shift is None:
            return self.cross
        return self.cross + torch.outer(self.target_sum, self.shift)


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
