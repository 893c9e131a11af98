"""Other transferability scores, on the same inputs and machinery as LogME.

Every score here is a function of a few sums over samples, computed once in
row chunks on the compute device (the features are never copied whole to
float64, except by the N <= D forms, which work on the N x N Gram matrix),
then a small amount of dense linear algebra over classes, class pairs or
feature dimensions, batched: there is no Python loop over classes.

    LEEP        P(y, z): the target/source-class joint        [Ct, Cs]
    NCE         counts of (source label, target label) pairs  [Cs, Ct]
    H-score     F^T F, class sums, class counts               [D, D], [C, D], [C]
    reg. H      the same + sum ||x||^2 x and sum ||x||^4      [D], []
    TransRate   per-class F_c^T F_c, class sums, counts       [C, D, D], ...
    GBC         per-class sums and sums of squares, counts    [C, D], [C, D], [C]

Each score is defined once, as two stages (docs/design.md, "A score in
two stages"): an update, which turns a batch into sums (``ClassMoments.add_``;
NCE's pair counts), and a compute, ``<score>_compute(state, ...)``, which
turns the state into the score. An accumulator
(``torch_logme.streaming_scores``) runs the update per batch and the compute
on its sums. The functional form runs the update once, on the whole data
set (``update_once``, or ``_moments`` for a score without a held form), then
the same compute. Where a form that reads the
rows themselves is cheaper (N <= D: the N x N Gram matrix; TransRate's
per-class blocks), that one update holds the rows (a ``WholeData``) instead
of summing them, and the compute takes that form for it.

Every sum is of x = (features - shift) * scale (a ``Frame``): the shift is
the feature mean (the functional scores) or the first batch's mean (the
accumulators), so that covariances formed from the sums lose no digits to
cancellation however far the features sit from 0; the scale is a power of
two, 1 for features of moderate magnitude (then the arithmetic is that of
the unscaled features, bitwise) and 2**-e for features too large or too
small for the sums, which makes the scaling exact. Every score here is
shift-invariant; the H-scores are scale-invariant too, and TransRate's eps
and GBC's variance floor are scaled with the features, so no score changes
but for round-off. A score whose absolute constant cannot be represented at
the features' scale raises a ValueError saying so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import Inputs, check_class_count, prepare, prepare_label_pair, prepare_probabilities
from ._options import compute_options
from ._primitives import (
    add_counts_,
    add_gram_,
    add_rows_,
    class_blocks,
    class_counts,
    class_sums,
    gram_full,
    itemsize,
    pinv_diagonal,
    row_chunks,
    safe_divide,
    safe_reciprocal,
    safe_rsqrt,
)
from ._validators import positive_float
from .sums import CONSTANT_COLUMN_EPS, int_shifted

__all__ = [
    "leep",
    "leep_from_probs",
    "nce",
    "h_score",
    "regularized_h_score",
    "transrate",
    "gbc",
    "ClassMoments",
    "DEFAULT_RCOND",
]

Device = Union[str, torch.device, None]

#: Relative cut-off of the pseudo-inverses in the H-scores: eigenvalues at or
#: below ``rcond * largest`` count as zero. Round-off puts the eigenvalues of
#: an exactly singular covariance near eps * sqrt(D) * largest, far below.
DEFAULT_RCOND = {torch.float64: 1e-10, torch.float32: 1e-4}


#: Largest |exponent| of the powers of two that scale features (and of the
#: scaled constants), well inside each dtype's normal range.
SCALE_LIMIT = {torch.float64: 1000, torch.float32: 120}

#: Memory bound of the temporaries of one block of classes (TransRate's
#: per-class Gram matrices, GBC's class-pair terms).
BLOCK_BYTES = 256 << 20
#: Fewest rows per class that one batched product of TransRate's Gram
#: matrices takes, so that huge D cannot shrink the products to single rows.
MIN_WINDOW = 256


# -- shared helpers ----------------------------------------------------------------


def _resolve(dtype: torch.dtype, device: Device) -> Tuple[torch.dtype, Optional[torch.device]]:
    """Validate ``dtype`` and ``device`` exactly as ``logme`` does."""
    options = compute_options(dtype=dtype, device=device)
    return options.dtype, options.device


def _check_classes(inputs: Inputs, elements: Callable[[int, int], int], what: str) -> None:
    """``check_class_count`` for a score whose state is ``elements(C, D)`` values."""
    c = inputs.num_columns
    check_class_count(c, inputs.num_samples, elements(c, inputs.num_features), what)


# -- frames: where the sums are taken --------------------------------------------


def work_dtype(features: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the shift is subtracted in, before converting to the compute ``dtype``.

    float64 unless the features and the compute dtype both fit float32: a
    float64 feature at 1e7 + 0.1 keeps its 0.1 only if the offset goes
    before the conversion to float32.
    """
    if dtype == torch.float64 or features in (torch.float64, torch.int64, torch.int32):
        return torch.float64
    return torch.float32


def scale_band(dtype: torch.dtype, power: int) -> int:
    """Features of magnitude 2**-band .. 2**band are summed unscaled (``power``: the highest power summed).

    Inside the band every product that sums of ``power``-th powers form is a
    normal number far from overflow, so scaling would change nothing.
    """
    return SCALE_LIMIT[dtype] // (2 * power)


def magnitude(f: Tensor) -> Tensor:
    """[D] float64: the largest |value| of each column of f [N, D] (one pass, no copy of f)."""
    if f.dtype == torch.bool:
        f = f.to(torch.uint8)
    low, high = torch.aminmax(f, dim=0)
    return torch.maximum(low.to(torch.float64).abs(), high.to(torch.float64).abs())


def pow2_scale(size: Tensor, band: int, limit: int) -> Tensor:
    """[D] float64 powers of two for columns of magnitude ``size`` [D] (float64).

    1 where the magnitude is 0 or within 2**-band .. 2**band; elsewhere
    2**-e with size * 2**-e in [0.5, 1), e clamped to +-``limit``.
    """
    _, e = torch.frexp(size)
    scale = torch.ldexp(torch.ones_like(size), -e.clamp(-limit, limit).to(torch.float64))
    inside = (size == 0) | ((size >= 2.0 ** -band) & (size <= 2.0 ** band))
    return torch.where(inside, torch.ones_like(scale), scale)


def log2_of(scale: Tensor) -> Tensor:
    """Exponents [D] (float64) of powers of two ``scale`` [D]."""
    return (torch.frexp(scale.to(torch.float64))[1] - 1).to(torch.float64)


def framed(
    rows: Tensor, dtype: torch.dtype, shift: Optional[Tensor], scale: Optional[Tensor] = None,
    centre: Optional[Tensor] = None,
) -> Tensor:
    """rows [B, D] as x = (rows - shift) * scale - centre, in ``dtype`` (a new tensor).

    The arithmetic is in the shift's dtype (see ``work_dtype``). The scale
    is a power of two, so rows * scale - shift * scale is (rows - shift) *
    scale bitwise, and cannot overflow where rows - shift would. ``centre``
    [D] (scaled units) removes what the shift left of the mean.
    """
    if shift is None:
        return rows.to(dtype)
    work = shift.dtype
    if rows.dtype == torch.int64 and work == torch.float64:
        x = int_shifted(rows, shift)
        if scale is not None:
            x = x * scale
    elif scale is None:
        x = rows.to(work) - shift
    else:
        x = torch.mul(rows.to(work), scale).sub_(shift * scale)
    if centre is not None:
        x = x - centre
    return x.to(dtype)


@dataclass
class Frame:
    """Where a data set's sums are taken: x = (f - shift) * scale - centre.

    shift: [D] the column means, in the work dtype (see ``work_dtype``).
    scale: [D] powers of two in the work dtype, or None when all are 1.
    centre: [D] or None: the mean of (f - shift) * scale, what the shift
        missed of the mean (an offset's last digits), for scores that use
        the centred rows themselves rather than moments.
    size: the features' largest magnitude, for messages.
    spread: with ``centre``, the largest column variance in scaled units.
    smallest: the smallest non-zero column magnitude, scaled (0 if none).
    """

    shift: Tensor
    scale: Optional[Tensor]
    centre: Optional[Tensor] = None
    size: float = 0.0
    spread: float = 0.0
    smallest: float = 0.0

    @property
    def log2_scale(self) -> Tensor:
        """[D] exponents of ``scale`` (zeros when it is None)."""
        if self.scale is None:
            return torch.zeros_like(self.shift, dtype=torch.float64)
        return log2_of(self.scale)


def make_frame(
    f: Tensor, dtype: torch.dtype, *, per_column: bool, power: int, centre: bool = False,
    largest: Optional[float] = None,
) -> Frame:
    """The frame of features f [N, D] summed in ``dtype``: one pass for the magnitudes, one for the mean.

    Args:
        per_column: one scale per column (scores invariant to scaling a
            column) rather than one for all.
        power: the highest power of the features the sums hold (2, or 4 for
            the shrinkage H-score).
        centre: also the mean and variances of the shifted rows (a third
            pass), for scores that work on centred rows.
        largest: max |f| when known (the input checks read it), which saves
            the magnitude pass of a frame with one scale for all columns.
    """
    n, d = f.shape
    work = work_dtype(f.dtype, dtype)
    if per_column:
        size = magnitude(f)
    elif largest is not None:
        size = torch.full((d,), float(largest), dtype=torch.float64, device=f.device)
    else:
        size = magnitude(f).amax().expand(d)
    scale: Optional[Tensor]  # None below when every scale is 1
    scale = pow2_scale(size, scale_band(dtype, power), SCALE_LIMIT[work])
    scaled = torch.where(size > 0, size * scale, torch.full_like(size, math.inf))
    largest, unit, smallest = torch.stack([size.max(), (scale == 1).all().to(torch.float64), scaled.min()]).tolist()
    scale = None if unit else scale.to(work)
    if largest * n < torch.finfo(work).max / 4 or scale is None:
        # The column means: only a shift (the moments are exact about any), but
        # one close to the mean keeps sums of squares from cancelling.
        shift = f.sum(0, dtype=work) / n
    else:  # the plain sum would overflow: sum scaled rows
        total = torch.zeros(d, dtype=work, device=f.device)
        zero = torch.zeros(d, dtype=work, device=f.device)
        for _, x in row_chunks(f, work, partial(framed, dtype=work, shift=zero, scale=scale)):
            total += x.sum(0)
        shift = total / n / scale
    frame = Frame(shift, scale, size=largest, smallest=0.0 if math.isinf(smallest) else smallest)
    if centre:
        total = torch.zeros(d, dtype=work, device=f.device)
        square = torch.zeros(d, dtype=work, device=f.device)
        for _, x in row_chunks(f, work, partial(framed, dtype=work, shift=shift, scale=scale)):
            total += x.sum(0)
            square += (x * x).sum(0)
        frame.centre = total / n
        frame.spread = max(0.0, float((square / n - frame.centre * frame.centre).amax()))
    return frame


def _resolvable(frame: Frame, dtype: torch.dtype, power: int, name: str) -> None:
    """Raise ValueError when a column's sums of ``power``-th powers underflow ``dtype`` even scaled.

    Only subnormal float64 features summed in float32 come this far below
    the scales' reach (SCALE_LIMIT); a scale-invariant score would then
    silently lose those columns.
    """
    if frame.smallest > 0 and math.log2(frame.smallest) * power < math.log2(torch.finfo(dtype).tiny) + 16:
        raise ValueError(
            f"{name}: features of magnitude {frame.smallest * 2.0 ** -SCALE_LIMIT[torch.float64]:.3g} are too "
            f"small to sum in {dtype}, even scaled by 2**{SCALE_LIMIT[torch.float64]}; multiply them by a "
            "constant or compute in float64"
        )


def _finite(score: Tensor, name: str, size: float, remedy: str = "divide the features by a constant") -> Tensor:
    """``score``, or a ValueError when it is not finite (the sums could not hold the features)."""
    if not bool(torch.isfinite(score)):
        raise ValueError(
            f"{name} came out {float(score)} for features of magnitude up to {size:.3g}: their sums "
            f"exceed the range of {score.dtype}; {remedy} (or compute in float64)"
        )
    return score


def _rcond(rcond: Optional[float], dtype: torch.dtype) -> float:
    if rcond is None:
        return DEFAULT_RCOND[dtype]
    if isinstance(rcond, bool) or not isinstance(rcond, (int, float)) or not 0 <= rcond < 1:
        raise ValueError(f"rcond must be a float in [0, 1), got {rcond!r}")
    return float(rcond)


@dataclass
class ClassMoments:
    """Sums over samples of x = (features - shift) * scale, some per class.

    counts: [C] samples per class.
    sums: [C, D] per-class sums of x.
    shift: [D] what was subtracted from the features (see ``framed``), or
        None when the sums are of the features themselves.
    gram: [D, D] sum of x x^T (its upper triangle: see ``full_gram``), or None.
    squares: [C, D] per-class sums of x * x, or None.
    norm_sq_sums: [D] sum of ||x||^2 x, or None.
    norm_quartic: [] sum of ||x||^4, or None.
    scale: [D] the powers of two the shifted features were multiplied by,
        or None for 1. The moments below are of x, in these units.
    class_grams: [C, D, D] per-class sums of x x^T (TransRate's
        accumulator sums them itself), or None.
    """

    counts: Tensor
    sums: Tensor
    shift: Optional[Tensor] = None
    gram: Optional[Tensor] = None
    squares: Optional[Tensor] = None
    norm_sq_sums: Optional[Tensor] = None
    norm_quartic: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    class_grams: Optional[Tensor] = None

    @classmethod
    def zeros(
        cls,
        num_features: int,
        num_classes: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        gram: bool = False,
        squares: bool = False,
        fourth: bool = False,
    ) -> "ClassMoments":
        kw: Dict[str, Any] = dict(dtype=dtype, device=device)
        d, c = num_features, num_classes
        return cls(
            torch.zeros(c, **kw),
            torch.zeros(c, d, **kw),
            None,
            torch.zeros(d, d, **kw) if gram else None,
            torch.zeros(c, d, **kw) if squares else None,
            torch.zeros(d, **kw) if fourth else None,
            torch.zeros((), **kw) if fourth else None,
        )

    def add_(self, features: Tensor, labels: Tensor) -> "ClassMoments":
        """Add a batch in place: features [B, D] (shifted and scaled as set here), int64 labels [B]."""
        dtype = self.sums.dtype
        convert = partial(framed, dtype=dtype, shift=self.shift, scale=self.scale)
        for rows, x in row_chunks(features, dtype, convert):
            y = labels[rows]
            add_counts_(self.counts, y)
            add_rows_(self.sums, y, x)
            if self.gram is not None:
                add_gram_(self.gram, x)
            if self.squares is not None:
                add_rows_(self.squares, y, x * x)
            if self.norm_sq_sums is not None:
                assert self.norm_quartic is not None  # zeros(fourth=True) makes both
                norm_sq = (x * x).sum(1)
                self.norm_sq_sums.add_(norm_sq @ x)
                self.norm_quartic.add_((norm_sq * norm_sq).sum())
        return self

    @property
    def num_samples(self) -> Tensor:
        return self.counts.sum()

    def mean(self) -> Tensor:
        """Mean [D] of x (not of the features: add ``shift`` for that)."""
        return self.sums.sum(0) / self.num_samples

    def feature_mean(self) -> Tensor:
        """Mean [D] of the features themselves."""
        mu = self.mean()
        if self.scale is not None:
            mu = mu / self.scale.to(mu.dtype)
        return mu if self.shift is None else mu + self.shift

    def full_gram(self) -> Tensor:
        """sum x x^T [D, D], symmetric (``gram`` may hold only its upper triangle)."""
        assert self.gram is not None, "these moments were summed without gram=True"
        return gram_full(self.gram)

    def covariance(self) -> Tensor:
        """Covariance [D, D] of x (of the features, in ``scale`` units), normalised by N (the MLE)."""
        mu = self.mean()
        return self.full_gram() / self.num_samples - torch.outer(mu, mu)

    def between(self) -> Tensor:
        """[C, D]: n_c (mean_c - mean), the class-mean offsets scaled by their counts."""
        return self.sums - self.counts[:, None] * self.mean()

    def between_weights(self) -> Tensor:
        """[C]: 1 / (N n_c) for present classes, 0 for absent ones.

        With ``between()`` this gives the between-class covariance
        sum_c (n_c / N) d_c d_c^T = sum_c b_c b_c^T / (N n_c), b_c = n_c d_c.
        """
        return safe_reciprocal(self.num_samples * self.counts, self.counts > 0)


def _moments(
    f: Tensor, y: Tensor, num_classes: int, dtype: torch.dtype, frame: Frame, **which: bool
) -> ClassMoments:
    """Moments of features [N, D] in ``frame``, labels [N] in 0..num_classes-1."""
    m = ClassMoments.zeros(f.shape[1], num_classes, dtype=dtype, device=f.device, **which)
    m.shift, m.scale = frame.shift, frame.scale
    return m.add_(f, y)


@dataclass
class WholeData:
    """The whole data set, held by a functional form's one update for a compute that reads its rows.

    features: [N, D] as given (any dtype), on the compute device.
    labels: [N] int64 class ids 0..num_classes-1.
    num_classes: C.
    frame: where the rows are taken (see ``Frame``).
    dtype: the compute dtype.
    """

    features: Tensor
    labels: Tensor
    num_classes: int
    frame: Frame
    dtype: torch.dtype


#: What a feature score's compute takes: sums over samples, or the whole data set.
State = Union[ClassMoments, WholeData]


def update_once(inputs: Inputs, dtype: torch.dtype, frame: Frame, *, hold: bool, **which: bool) -> State:
    """The functional form's update: the whole data set, summed into moments (``which`` as
    ``ClassMoments.zeros`` takes them) in ``frame``, or held as it is (``hold``) for a compute
    whose form reads the rows."""
    if hold:
        return WholeData(inputs.features, inputs.targets, inputs.num_columns, frame, dtype)
    return _moments(inputs.features, inputs.targets, inputs.num_columns, dtype, frame, **which)


def _constant_columns(var: Tensor, mean: Tensor) -> Tensor:
    """[D] bool: columns whose variance is round-off of their second moment about the shift.

    ``mean`` is the column mean of the shifted data, so var + mean^2 is the
    mean square the variance was computed from. A column of one repeated
    value has var = 0 (when the shift hits it) or the round-off of
    mean^2 - mean^2; the mean square of the raw column would also count as
    constant every column whose spread is small next to its offset.
    """
    eps = torch.finfo(var.dtype).eps
    return var <= CONSTANT_COLUMN_EPS * eps * (var + mean * mean)


# -- LEEP and NCE: scores of the source model's predictions -------------------------


def leep(
    source_probs: Any,
    target_labels: Any,
    *,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """LEEP (Nguyen et al., ICML 2020): log expected empirical prediction.

    Args:
        source_probs: [N, Cs] the source model's class probabilities (softmax
            outputs; rows sum to 1), tensor or numpy array, any device.
        target_labels: [N] target class ids 0..Ct-1.
        dtype: compute precision (float64 by default).
        device: where to compute; default where ``source_probs`` are.

    Returns:
        0-dim tensor: (1/N) sum_i log sum_z P(y_i | z) theta_i(z), with the
        empirical P(y | z) = P(y, z) / P(z), P(y, z) = (1/N) sum_{i: y_i = y}
        theta_i(z). Larger is better; it is an average log-likelihood, <= 0.
        Source classes that get no probability mass contribute nothing.
    """
    dtype, device = _resolve(dtype, device)
    p, y, num_target = prepare_probabilities(source_probs, target_labels, device=device)
    n, cs = p.shape
    check_class_count(num_target, n, num_target * cs, "LEEP's joint (Ct x Cs)", "target_labels")
    with torch.no_grad():
        return leep_from_probs(p, y, num_target, dtype)


def leep_from_probs(p: Tensor, y: Tensor, num_target: int, dtype: torch.dtype, *, log: bool = True) -> Tensor:
    """LEEP of validated probabilities p [N, Cs] for int64 labels y [N] in 0..num_target-1.

    ``log=False``: the mean of the expected empirical predictions without
    the log, as some published code computes it (NLEEP's ``legacy_leep``).
    """
    n, cs = p.shape
    joint = torch.zeros(num_target, cs, dtype=dtype, device=p.device)
    for rows, chunk in row_chunks(p, dtype, whole_if_same=True):
        add_rows_(joint, y[rows], chunk)
    joint /= n
    marginal = joint.sum(0)
    cond = safe_divide(joint, marginal, marginal > 0)  # [Ct, Cs]: P(y | z)
    total = torch.zeros((), dtype=dtype, device=p.device)
    for rows, chunk in row_chunks(p, dtype):
        # The expected empirical prediction of each sample's own label.
        eep = (cond[y[rows]] * chunk).sum(1)
        total += (eep.log() if log else eep).sum()
    return total / n


def nce_from_counts(joint_counts: Tensor) -> Tensor:
    """NCE's compute: the score from the [Cs, Ct] counts of (source label, target label) pairs.

    Its update adds a batch's pairs to the counts (``add_counts_``): the
    functional form does that once, an accumulator per batch.
    """
    joint = joint_counts / joint_counts.sum()
    source = joint.sum(1, keepdim=True)
    seen = joint > 0
    safe_joint = torch.where(seen, joint, torch.ones_like(joint))
    safe_source = torch.where(source > 0, source, torch.ones_like(source))
    # 0 log 0 = 0: pairs never seen contribute nothing.
    return torch.where(seen, joint * torch.log(safe_joint / safe_source), torch.zeros_like(joint)).sum()


def nce(
    source_labels: Any,
    target_labels: Any,
    *,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """NCE (Tran et al., ICCV 2019): negative conditional entropy -H(Y | Z).

    Args:
        source_labels: [N] the source model's hard labels Z (argmax of its
            predictions), ids 0..Cs-1.
        target_labels: [N] target class ids Y, 0..Ct-1.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor sum_{z, y} P(z, y) log P(y | z) with the empirical joint
        of the N pairs. Larger is better; <= 0, and 0 when Z determines Y.
    """
    dtype, device = _resolve(dtype, device)
    s, t, cs, ct = prepare_label_pair(source_labels, target_labels, device=device)
    assert cs is not None and ct is not None  # read, as check_values is left on
    classes, name = max((cs, "source_labels"), (ct, "target_labels"))
    check_class_count(classes, s.shape[0], cs * ct, "NCE's joint counts (Cs x Ct)", name)
    with torch.no_grad():
        counts = torch.zeros(cs * ct, dtype=dtype, device=s.device)
        add_counts_(counts, s * ct + t)
        return nce_from_counts(counts.view(cs, ct))


# -- H-score and its shrinkage version ------------------------------------------


def h_score_from_moments(m: ClassMoments, rcond: float) -> Tensor:
    """H-score from counts, class sums and F^T F (primal: a D x D eigendecomposition).

    The covariance is standardised first (the score is invariant to
    rescaling the features), so the pseudo-inverse's cut-off is relative to
    correlations, not to the raw scale of each column.
    """
    cov = m.covariance()
    var = cov.diagonal()
    constant = _constant_columns(var, m.mean())
    scale = safe_rsqrt(var, ~constant)
    corr = cov * scale[:, None] * scale[None, :]
    lam, vec = torch.linalg.eigh(corr)
    proj = (m.between() * scale) @ vec  # [C, D]: class offsets in the eigenbasis
    return (m.between_weights()[:, None] * proj * proj * pinv_diagonal(lam, rcond)).sum()


def _dual_standardised(f: Tensor, dtype: torch.dtype, frame: Frame, standardise: bool) -> Tensor:
    """Centred (and optionally standardised) features [N, D] in ``dtype``, for N <= D.

    Centred in two steps: the frame's shift, then the mean of what is left,
    which the shift missed by the last digits of any offset.
    """
    x = framed(f, dtype, frame.shift, frame.scale)
    mean = x.mean(0)
    x -= mean
    if standardise:
        var = (x * x).mean(0)
        constant = _constant_columns(var, mean)
        scale = safe_rsqrt(var, ~constant)
        x = x * scale
    return x


def _h_score_dual(
    f: Tensor, y: Tensor, num_classes: int, dtype: torch.dtype, rcond: float, frame: Frame
) -> Tensor:
    """H-score for N <= D from the N x N Gram matrix of the standardised, centred features.

    With K = X X^T / N = U diag(lam) U^T, tr(cov^+ cov_between) equals
    sum over kept eigenvectors u_i of sum_c (u_i . 1_c)^2 / n_c.
    """
    x = _dual_standardised(f, dtype, frame, standardise=True)
    lam, u = torch.linalg.eigh(x @ x.T / x.shape[0])
    sums = class_sums(u, y, num_classes)
    keep = pinv_diagonal(lam, rcond) > 0
    return (safe_reciprocal(class_counts(y, num_classes, u.dtype))[:, None] * sums * sums * keep).sum()


def h_score_compute(state: State, rcond: float) -> Tensor:
    """H-score from its state: sums (the primal, D x D form) or the whole data (the N <= D form)."""
    if isinstance(state, WholeData):
        return _h_score_dual(state.features, state.labels, state.num_classes, state.dtype, rcond, state.frame)
    return h_score_from_moments(state, rcond)


def h_score(
    features: Any,
    labels: Any,
    *,
    rcond: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """H-score (Bao et al., ICIP 2019): tr(cov(f)^+ cov(E[f | y])).

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        rcond: relative cut-off of the pseudo-inverse (default 1e-10 in
            float64, 1e-4 in float32), applied to the correlation matrix.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor in [0, C - 1]. Larger is better. Both covariances are
        normalised by N (the ratio does not depend on the normalisation).
        Columns are standardised before the pseudo-inverse and constant
        columns are dropped; for full-rank features this is exactly the
        paper's score, which is invariant to rescaling the features (and
        to shifting them): any magnitude and offset give the same score.
    """
    dtype, device = _resolve(dtype, device)
    rcond = _rcond(rcond, dtype)
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * d, "H-score's class sums (C x D)")
    f = inputs.features
    with torch.no_grad():
        # One power of two per column: the score standardises the columns anyway.
        frame = make_frame(f, dtype, per_column=True, power=2)
        _resolvable(frame, dtype, 2, "H-score")
        state = update_once(inputs, dtype, frame, hold=inputs.num_samples <= inputs.num_features, gram=True)
        return _finite(h_score_compute(state, rcond), "H-score", frame.size)


def _ledoit_wolf(
    trace: Tensor, fro_sq: Tensor, dev_sq: Tensor, quartic: Tensor, n: Tensor, p: int
) -> Tuple[Tensor, Tensor]:
    """Ledoit & Wolf (2004) shrinkage of the covariance S towards mu I.

    Args: tr(S), ||S||_F^2, ||S - mu I||_F^2, sum_k ||x_k||^4 over centred
    samples, N and the dimension p. Returns (shrinkage alpha in [0, 1],
    mu = tr(S) / p); the estimate is (1 - alpha) S + alpha mu I.
    """
    mu = trace / p
    delta = dev_sq / p  # d^2 = ||S - mu I||^2 in the paper's normalised norm
    # b-bar^2 = (1/N^2) sum_k ||x_k x_k^T - S||^2 = (sum_k ||x_k||^4 - N ||S||^2) / N^2
    beta_bar = ((quartic / n - fro_sq) / (n * p)).clamp_min(0)
    beta = torch.minimum(beta_bar, delta)
    alpha = safe_divide(beta, delta, delta > 0)
    return alpha, mu


def regularized_h_score_from_moments(m: ClassMoments, rcond: float) -> Tensor:
    """Shrinkage H-score from counts, class sums, F^T F and the fourth-moment sums."""
    assert m.norm_quartic is not None and m.norm_sq_sums is not None, "moments summed without fourth=True"
    n = m.num_samples
    p = m.sums.shape[1]
    mu = m.mean()
    gram = m.full_gram()
    cov = gram / n - torch.outer(mu, mu)
    # sum_k ||x_k - mu||^4 from the raw sums, expanding the square of ||x||^2 - 2 x.mu + ||mu||^2.
    mu_sq = mu @ mu
    quartic = (
        m.norm_quartic - 4 * (mu @ m.norm_sq_sums) + 4 * (mu @ gram @ mu)
        + 2 * mu_sq * gram.trace() - 3 * n * mu_sq * mu_sq
    )
    trace = cov.trace()
    dev = cov.clone()
    dev.diagonal().sub_(trace / p)
    alpha, target = _ledoit_wolf(trace, (cov * cov).sum(), (dev * dev).sum(), quartic, n, p)
    lam, vec = torch.linalg.eigh(cov)
    shrunk = (1 - alpha) * lam + alpha * target
    proj = m.between() @ vec
    return (1 - alpha) * (m.between_weights()[:, None] * proj * proj * pinv_diagonal(shrunk, rcond)).sum()


def _regularized_h_score_dual(
    f: Tensor, y: Tensor, num_classes: int, dtype: torch.dtype, rcond: float, frame: Frame
) -> Tensor:
    """Shrinkage H-score for N <= D, from the N x N Gram matrix K = X X^T / N of centred features.

    S = X^T X / N shares its non-zero eigenvalues lam with K; the D - N others
    are 0. tr(S), ||S||_F^2 and sum_k ||x_k||^4 = sum_k (N K_kk)^2 all follow
    from K, and the class offsets lie in the span of the eigenvectors of the
    non-zero eigenvalues, where their term is lam (u_i . 1_c)^2 / (n_c shrunk_i).
    """
    x = _dual_standardised(f, dtype, frame, standardise=False)
    n, p = x.shape
    k = x @ x.T / n
    lam, u = torch.linalg.eigh(k)
    lam = lam.clamp_min(0)
    trace = lam.sum()
    mu = trace / p
    dev_sq = ((lam - mu) ** 2).sum() + (p - n) * mu * mu
    quartic = ((n * k.diagonal()) ** 2).sum()
    nt = torch.tensor(float(n), dtype=dtype, device=x.device)
    alpha, target = _ledoit_wolf(trace, (lam * lam).sum(), dev_sq, quartic, nt, p)
    shrunk = (1 - alpha) * lam + alpha * target
    # The D - N zero eigenvalues shrink to alpha * mu: they set the cut-off's scale too.
    inv = pinv_diagonal(torch.cat([shrunk, (alpha * target).reshape(1)]), rcond)[:n]
    sums = class_sums(u, y, num_classes)
    inverse_counts = safe_reciprocal(class_counts(y, num_classes, u.dtype))
    return (1 - alpha) * (inverse_counts[:, None] * sums * sums * lam * inv).sum()


def regularized_h_score_compute(state: State, rcond: float) -> Tensor:
    """Shrinkage H-score from its state: sums (the D x D form) or the whole data (the N <= D form)."""
    if isinstance(state, WholeData):
        return _regularized_h_score_dual(
            state.features, state.labels, state.num_classes, state.dtype, rcond, state.frame
        )
    return regularized_h_score_from_moments(state, rcond)


def regularized_h_score(
    features: Any,
    labels: Any,
    *,
    rcond: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """Shrinkage-regularised H-score (Ibrahim et al., ECML PKDD 2022).

    tr(S_alpha^-1 (1 - alpha) cov(E[f | y])) with the Ledoit-Wolf (2004)
    estimate S_alpha = (1 - alpha) S + alpha (tr(S) / D) I of the feature
    covariance S and its optimal shrinkage alpha.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        rcond: relative cut-off of the pseudo-inverse of S_alpha (only bites
            when alpha = 0); default 1e-10 (float64), 1e-4 (float32).
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor in [0, C - 1]. Larger is better. S and the
        between-class covariance are both normalised by N (the MLE, as
        Ledoit-Wolf's S is). Invariant to shifting the features and to
        scaling them all by one factor: any magnitude gives the same score.
    """
    dtype, device = _resolve(dtype, device)
    rcond = _rcond(rcond, dtype)
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * d, "the regularized H-score's class sums (C x D)")
    f = inputs.features
    with torch.no_grad():
        # One power of two for all columns (the shrinkage target mu I is not
        # invariant to scaling a column), sized for sums of ||x||^4.
        frame = make_frame(f, dtype, per_column=False, power=4, largest=inputs.magnitude)
        _resolvable(frame, dtype, 4, "regularized H-score")
        hold = inputs.num_samples <= inputs.num_features
        state = update_once(inputs, dtype, frame, hold=hold, gram=True, fourth=True)
        return _finite(regularized_h_score_compute(state, rcond), "regularized H-score", frame.size)


# -- TransRate -------------------------------------------------------------------


def logdet_spd(a: Tensor) -> Tensor:
    """log det of symmetric positive definite matrices [..., K, K] (Cholesky; eigvalsh if that fails)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        return torch.linalg.eigvalsh(a).clamp_min(torch.finfo(a.dtype).tiny).log().sum(-1)
    return 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)


#: Round-off in A = Z^T Z / (n eps) is about eps_machine ||A||: an
#: eigenvalue that is 0 in exact arithmetic (Z of lower rank than K: fewer
#: samples than dimensions, duplicated or constant columns) comes out about
#: that size and adds about as much to log det(I + A). While eps_machine
#: ||A||_F stays below this (per compute dtype) that is negligible, and one
#: Cholesky factorisation gives log det(I + A); above it (features far from
#: unit scale) see ``logdet_identity_plus_``. float32 tolerates more: its
#: own round-off hides directions that the eigenvalue route would drop.
RATE_ROUNDOFF = {torch.float64: 1e-8, torch.float32: 1.0}
#: Eigenvalues of B (see ``logdet_identity_plus_``) up to this many times
#: their round-off bound are taken as 0. Measured, the zeros of Gram
#: matrices come out at up to about sqrt(K) eps_machine max(lam), the bound
#: for entries that are round-off of their diagonal.
ROUNDOFF_FACTOR = 4.0


def logdet_identity_plus_(a: Tensor, noise: Optional[Tensor] = None) -> Tensor:
    """[B]: log det(I + A) for symmetric PSD matrices A [B, K, K] (overwritten).

    ``noise`` [B, K]: the magnitudes the round-off of A is relative to,
    entry (i, j) about eps_machine sqrt(noise_i noise_j); by default diag(A)
    (a Gram matrix summed directly). Matrices built from sums about another
    point (the accumulators' centring algebra) pass larger ones.

    Where round-off can matter (eps_machine ||A||_F > RATE_ROUNDOFF), it is
    read from B = D^-1/2 A D^-1/2 (D = diag(A)), whose unit diagonal keeps
    badly scaled columns harmless: round-off moves B by up to about
    eps_machine rho_i rho_j, rho_i^2 = noise_i / D_i, so eigenvalues of B up
    to ROUNDOFF_FACTOR eps_machine max(rho) ||rho|| max(lam) are round-off.
    (Columns whose D_i is itself round-off of noise_i are 0: unresolved.)
    A Cholesky factorisation of B minus that bound tells whether every
    eigenvalue stands above it; if so, or where round-off is negligible
    anyway, one Cholesky factorisation of I + A gives the log det.
    Otherwise B = V diag(lam) V^T loses the round-off eigenvalues, which are
    0 in exact arithmetic and which I + A would count as log(1 + round-off)
    each (tens, for features at 1e30), and with U = D^1/2 V diag(lam)^1/2
    the log det is that of I + U^T U (Sylvester's identity), whose dropped
    columns are exactly 0.
    """
    eps = torch.finfo(a.dtype).eps
    norm = torch.linalg.matrix_norm(a)
    if noise is not None:
        norm = torch.maximum(norm, noise.amax(-1))
    suspect = norm * eps > RATE_ROUNDOFF[a.dtype]
    if bool(suspect.any()):
        sub = a[suspect]
        b, d, floor = _correlation(sub, None if noise is None else noise[suspect])
        # Unresolved columns (d = 0) are round-off: 0 in A too, whichever way it goes on.
        live = d > 0
        a[suspect] = torch.where(live[:, :, None] & live[:, None, :], sub, torch.zeros_like(sub))
        probe = -(floor * torch.linalg.matrix_norm(b))[:, None] * live + (~live).to(a.dtype)
        _, info = torch.linalg.cholesky_ex(b + torch.diag_embed(probe))
        suspect[suspect.clone()] = info != 0
    if not bool(suspect.any()):
        a.diagonal(dim1=-2, dim2=-1).add_(1)
        return logdet_spd(a)
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    clean = ~suspect
    if bool(clean.any()):
        plus = a[clean]
        plus.diagonal(dim1=-2, dim2=-1).add_(1)
        out[clean] = logdet_spd(plus)
    b, d, floor = _correlation(a[suspect], None if noise is None else noise[suspect])
    lam, vec = torch.linalg.eigh(b)
    kept = torch.where(lam > floor[:, None] * lam.amax(-1, keepdim=True), lam, torch.zeros_like(lam))
    u = d.sqrt()[:, :, None] * vec * kept.sqrt()[:, None, :]
    m = u.transpose(1, 2) @ u
    m.diagonal(dim1=-2, dim2=-1).add_(1)
    out[suspect] = logdet_spd(m)
    return out


def _correlation(a: Tensor, noise: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(B = D^-1/2 A D^-1/2 [B, K, K], the diagonal D [B, K], B's round-off bound [B]).

    Columns whose diagonal is 0, or round-off of ``noise``, are 0 in B and D.
    """
    eps = torch.finfo(a.dtype).eps
    d = a.diagonal(dim1=-2, dim2=-1).clone()
    if noise is None:
        noise = d
    resolved = d > CONSTANT_COLUMN_EPS * eps * noise
    d = torch.where(resolved, d, torch.zeros_like(d))
    inv_root = torch.where(resolved, d.clamp_min(torch.finfo(a.dtype).tiny).rsqrt(), torch.zeros_like(d))
    rho_sq = torch.where(resolved, noise * inv_root * inv_root, torch.zeros_like(d))  # 1 for a direct Gram
    floor = ROUNDOFF_FACTOR * eps * (rho_sq.amax(-1) * rho_sq.sum(-1)).sqrt()
    return a * inv_root[:, :, None] * inv_root[:, None, :], d, floor


def _coding_rates(gram: Tensor, counts: Tensor, eps: float, noise: Optional[Tensor] = None) -> Tensor:
    """[B]: 1/2 log det(I + G_c / (n_c eps)) for Gram matrices [B, K, K] of classes with counts [B] > 0.

    ``noise`` [B, K]: see ``logdet_identity_plus_`` (in the units of gram).
    NaN where an entry of G_c / (n_c eps) overflows (the caller raises).
    """
    scale = (counts * eps)[:, None]
    a = gram / scale[:, :, None]
    if not bool(torch.isfinite(a).all()):
        return torch.full(a.shape[:1], float("nan"), dtype=a.dtype, device=a.device)
    return 0.5 * logdet_identity_plus_(a, None if noise is None else noise / scale)


def class_gram_blocks(
    f: Tensor,
    y: Tensor,
    counts_host: List[int],
    shift: Optional[Tensor],
    dtype: torch.dtype,
    *,
    dual: bool,
    total: Optional[Tensor] = None,
    budget: int = BLOCK_BYTES,
    scale: Optional[Tensor] = None,
    centre: Optional[Tensor] = None,
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Per-class Gram matrices of x = (f - shift) * scale - centre (see ``framed``), a block of classes at a time.

    Yields (class ids [B], grams [B, K, K]) for every class with samples:
    K = D (x_c^T x_c) or, when ``dual`` and the block's largest class has
    fewer than D samples, K = that size (x_c x_c^T, zero-padded: a padded
    row adds an identity row to I + G and nothing to its log det).

    Classes are taken in order of size, so a block pads to a similar size;
    rows are gathered into a zero-padded [B, R, D] tensor, R rows per class
    at a time (a window), and multiplied as one batched matmul. The blocks
    and windows bound the temporaries by ``budget`` bytes; they are a loop
    over data, not over classes.

    ``total`` [D, D], when given, receives the sum of x x^T over all the rows
    (exact in its upper triangle): the whole data's Gram matrix, for the
    cost of the dual blocks' rows only, since the primal blocks' Gram
    matrices already sum to their part.
    """
    device, d = f.device, f.shape[1]
    item = itemsize(dtype)

    def cost(num: int, largest: int) -> int:
        if dual and largest < d:  # the whole class at once, and its Gram matrix
            return num * (largest * d + largest * largest) * item
        return num * (min(largest, MIN_WINDOW) * d + d * d) * item  # a window of rows, and D x D

    for block in class_blocks(y, counts_host, cost, budget):
        num, largest = len(block.ids), block.largest
        use_dual = dual and largest < d
        if use_dual:
            window = largest
        else:  # as many rows as the budget leaves beside the Gram matrices
            spare = (budget - num * d * d * item) // (num * d * item)
            window = min(largest, max(MIN_WINDOW, spare))
        k = largest if use_dual else d
        grams = torch.zeros(num, k, k, dtype=dtype, device=device)
        for valid, rows in block.windows(window):
            padded = torch.zeros(num, window, d, dtype=dtype, device=device)
            padded[valid] = framed(f[rows], dtype, shift, scale, centre)
            if use_dual:
                grams += padded @ padded.transpose(1, 2)
                if total is not None:
                    add_gram_(total, padded.reshape(-1, d))
            else:
                grams += padded.transpose(1, 2) @ padded
        if total is not None and not use_dual:
            total += grams.sum(0)
        yield torch.tensor(block.ids, dtype=torch.int64, device=device), grams


def _pow10(log2_value: float) -> str:
    """2**log2_value written as a decimal, even where it overflows a float."""
    exponent10 = log2_value * math.log10(2)
    whole = math.floor(exponent10)
    return f"{10 ** (exponent10 - whole):.2g}e{whole:+d}"


def rate_eps(eps: float, log2_scale: float, spread: float, n: int, dtype: torch.dtype) -> Tuple[float, float]:
    """(g, eps_f): Z^T Z / (k eps) of the features is (G g) / (k eps_f) of their Gram matrices G in the frame.

    G are Gram matrices of x = z * 2**log2_scale; ``spread`` is the largest
    diagonal entry of the whole data's centred G / N. For features of
    moderate magnitude (no scaling) g = 1 and eps_f = eps: the arithmetic of
    the unscaled features, bitwise. Otherwise the power of two g brings the
    spread near 1 and eps_f = eps 4**log2_scale / g, a number of the size of
    1 / (Z^T Z / (N eps)): it is out of range exactly when that is.

    Raises ValueError when Z^T Z / (N eps) overflows ``dtype`` (eps_f is
    not a normal number): TransRate's eps is absolute, so features far from
    unit scale need a larger eps (or rescaling). When it underflows (tiny
    features), eps_f is capped: every coding rate is then log det(I + ~0) =
    0, as it is to working precision.
    """
    if log2_scale == 0:
        return 1.0, eps
    limit = SCALE_LIMIT[dtype]
    j = math.frexp(spread)[1] if spread > 0 else 0
    log2_eps_f = math.log2(eps) + 2 * log2_scale - j
    if log2_eps_f < math.log2(torch.finfo(dtype).tiny) + 1:
        raise ValueError(
            f"TransRate: features with a spread (RMS about their mean) of "
            f"{_pow10(0.5 * math.log2(max(spread, 2.0 ** -1074)) - log2_scale)} make Z^T Z / (N eps) "
            f"overflow {dtype} with eps={eps:g}. TransRate is not scale-invariant (eps is absolute): "
            "divide the features by a constant (towards unit scale) or raise eps"
        )
    if log2_eps_f > limit:
        return 1.0, 2.0 ** limit
    return 2.0 ** -j, math.ldexp(eps, int(2 * log2_scale - j))


def transrate_from_class_grams(
    class_grams: Tensor, sums: Tensor, counts: Tensor, eps: float, budget: int = BLOCK_BYTES,
    *, log2_scale: float = 0,
) -> Tensor:
    """TransRate from per-class sums of x x^T [C, D, D], class sums [C, D] and counts [C].

    Centres every class's second moment at the global mean mu:
    Z_c^T Z_c = G_c - s_c mu^T - mu s_c^T + n_c mu mu^T; their sum over
    classes is the whole data's Z^T Z = G - N mu mu^T. Classes are taken a
    block at a time so that the centred copies stay within ``budget`` bytes.
    The sums may be of any shift of the features (the score is
    shift-invariant), scaled by 2**log2_scale (``rate_eps`` scales eps).
    """
    c, d = sums.shape
    n = counts.sum()
    mu = sums.sum(0) / n
    outer = torch.outer(mu, mu)
    second = class_grams.diagonal(dim1=1, dim2=2)  # [C, D]
    whole_gram = class_grams.sum(0) - n * outer
    g, eps_f = rate_eps(eps, log2_scale, float(whole_gram.diagonal().amax() / n), int(n.item()), sums.dtype)
    # The centring is algebra on sums about another point: its round-off is
    # relative to those sums, not to the (possibly much smaller) centred ones.
    noise = (second.sum(0) + n * mu * mu)[None] * g
    if g != 1.0:
        whole_gram *= g
    whole = _coding_rates(whole_gram[None], n.reshape(1), eps_f, noise)[0]
    cond = torch.zeros((), dtype=sums.dtype, device=sums.device)
    step = max(1, budget // max(1, 3 * d * d * itemsize(sums.dtype)))
    for start in range(0, c, step):  # blocks of classes, to bound memory
        rows = slice(start, min(start + step, c))
        k = counts[rows]
        cross = sums[rows, :, None] * mu[None, None, :]  # s_c mu^T
        centred = class_grams[rows] - cross - cross.transpose(1, 2) + k[:, None, None] * outer
        noise = (second[rows] + 2 * (sums[rows] * mu).abs() + k[:, None] * mu * mu) * g
        if g != 1.0:
            centred *= g
        present = k > 0
        rates = _coding_rates(centred, torch.where(present, k, torch.ones_like(k)), eps_f, noise)
        cond = cond + torch.where(present, k / n * rates, torch.zeros_like(k)).sum()
    return whole - cond


def transrate(
    features: Any,
    labels: Any,
    *,
    eps: float = 1e-4,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """TransRate (Huang et al., ICML 2022): the coding-rate difference R(Z) - R(Z | Y).

    With Z the features centred at their mean and Z_c the rows of class c,
    R(Z) = 1/2 log det(I + Z^T Z / (N eps)) and
    R(Z | Y) = sum_c (n_c / N) 1/2 log det(I + Z_c^T Z_c / (n_c eps)).

    Two choices (see the TransRate page of the docs): the conditional rate weights classes by
    their frequency n_c / N, as the paper defines it (the published code
    averages uniformly over ids 0..max, which fails on an absent id); and
    ``eps`` scales as in the published code, 1 / (n eps), which is the
    paper's d / (n eps'^2) with eps' = sqrt(d eps).

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        eps: distortion (default 1e-4, as published).
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor, >= 0 up to round-off. Larger is better. Invariant to
        shifting the features. eps is absolute, so the score depends on the
        features' scale; features whose Z^T Z / (N eps) overflows the
        compute dtype raise a ValueError.
    """
    dtype, device = _resolve(dtype, device)
    eps = positive_float(eps, "eps")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * d * d, "TransRate's class Gram matrices (C x D x D)")
    with torch.no_grad():
        # Z is the rows themselves, not moments: centre them to the last digit (``centre``).
        frame = make_frame(inputs.features, dtype, per_column=False, power=2, centre=True, largest=inputs.magnitude)
        # Its per-class blocks take each class's N_c x N_c or D x D Gram matrix, whichever is smaller:
        # the one update holds the rows.
        state = update_once(inputs, dtype, frame, hold=True)
        remedy = "divide the features by a constant or raise eps"
        return _finite(transrate_compute(state, eps), "TransRate", frame.size, remedy)


def transrate_compute(state: State, eps: float) -> Tensor:
    """TransRate from its state: per-class Gram sums (``class_grams``, an accumulator's) or the whole data."""
    if isinstance(state, WholeData):
        return _transrate_rows(state, eps)
    assert state.class_grams is not None, "TransRate's state holds its class Gram matrices"
    log2_scale = 0.0 if state.scale is None else float(log2_of(state.scale[:1]))
    return transrate_from_class_grams(state.class_grams, state.sums, state.counts, eps, log2_scale=log2_scale)


def _transrate_rows(state: WholeData, eps: float) -> Tensor:
    """TransRate of the whole data, a block of classes at a time, each in its cheaper (primal or dual) form."""
    f, y, frame, dtype = state.features, state.labels, state.frame, state.dtype
    n = f.shape[0]
    g, eps_f = rate_eps(eps, float(frame.log2_scale[0]), frame.spread, n, dtype)
    counts = class_counts(y, state.num_classes, dtype)
    counts_host = [int(v) for v in counts.tolist()]
    cond = torch.zeros((), dtype=dtype, device=f.device)
    # With N > D the class blocks also sum the whole data's D x D Gram matrix.
    whole = torch.zeros(f.shape[1], f.shape[1], dtype=dtype, device=f.device) if n > f.shape[1] else None
    for ids, grams in class_gram_blocks(
        f, y, counts_host, frame.shift, dtype, dual=True, total=whole, scale=frame.scale, centre=frame.centre
    ):
        if g != 1.0:
            grams *= g
        cond = cond + (counts[ids] / n * _coding_rates(grams, counts[ids], eps_f)).sum()
    if whole is None:  # N <= D: the N x N Gram matrix of all rows
        for _, gram in class_gram_blocks(
            f, torch.zeros_like(y), [n], frame.shift, dtype, dual=True, scale=frame.scale, centre=frame.centre
        ):
            whole = gram[0]
    else:
        whole = gram_full(whole)
    assert whole is not None  # the loop above yields its one block
    if g != 1.0:
        whole *= g
    return _coding_rates(whole[None], counts.new_full((1,), n), eps_f)[0] - cond


# -- GBC -----------------------------------------------------------------------------


def variance_floor(
    min_variance: float, scale: Optional[Tensor], d: int, dtype: torch.dtype, device: torch.device
) -> Tuple[Tensor, Optional[Tensor]]:
    """GBC's floor [D] in the units of features scaled by ``scale`` [D], and a lift [D] or None.

    The floor of column j is min_variance * scale_j^2. For features of
    moderate magnitude (scale None) it is min_variance itself. Where it
    would underflow (huge features) the column's means and variances are
    multiplied by lift_j^2 = 4**l (l at most what keeps them finite) and the
    floor with them; where it would overflow (tiny features) it is capped
    far above every variance, which leaves every term as it is to working
    precision. The Bhattacharyya distance is invariant to scaling a column
    together with its floor, so none of this changes the score.

    Raises ValueError when even the lifted floor underflows.
    """
    if scale is None:
        return torch.full((d,), min_variance, dtype=dtype, device=device), None
    limit = SCALE_LIMIT[dtype]
    twice = 2 * log2_of(scale).to(device)  # the floor's exponent, less log2(min_variance)
    exponent = math.log2(min_variance) + twice
    lift = ((-limit - exponent) / 2).ceil().clamp(0, (limit - 4) // 2)
    if bool((exponent + 2 * lift < -limit).any()):
        size = float(-log2_of(scale).amin())
        raise ValueError(
            f"GBC: features of magnitude up to {_pow10(size)} are too large for min_variance={min_variance:g} "
            f"in {dtype}: the variance floor, scaled with them, underflows. GBC's floor is absolute (it "
            "assumes features of about unit scale): divide the features by a constant or raise min_variance"
        )
    floor = torch.where(
        exponent + 2 * lift > limit,
        torch.full_like(exponent, 2.0 ** limit),
        torch.ldexp(torch.full_like(exponent, min_variance), twice + 2 * lift),
    )
    factor = torch.ldexp(torch.ones_like(lift), lift) if bool((lift > 0).any()) else None
    return floor.to(dtype), None if factor is None else factor.to(dtype)


def gbc_from_moments(counts: Tensor, sums: Tensor, squares: Tensor, min_variance: float,
                     budget: int = BLOCK_BYTES, *, scale: Optional[Tensor] = None) -> Tensor:
    """GBC from per-class counts [C], sums [C, D] and sums of squares [C, D] (of shifted features).

    ``scale`` [D]: the powers of two the shifted features were multiplied by
    (None: 1); see ``variance_floor``. The Bhattacharyya coefficient is
    symmetric, so only pairs i < j are evaluated (and counted twice): a
    block of classes i against the classes from the block's first one on,
    [B, C - start, D] at a time, with B chosen so that a block's
    temporaries stay within ``budget`` bytes. Only the classes present are
    paired: absent ids (one stray label of 10**4) add nothing but C^2 work.
    """
    present = counts > 0
    if not bool(present.all()):
        counts, sums, squares = counts[present], sums[present], squares[present]
        present = counts > 0
    c, d = sums.shape
    mean = safe_divide(sums, counts[:, None], present[:, None])
    second = safe_divide(squares, counts[:, None], present[:, None])
    var = second - mean * mean
    # A variance within round-off of the class's second moment about the shift
    # is that of a column constant within the class: 0, which the floor then
    # replaces, as it would for exact data.
    eps = torch.finfo(var.dtype).eps
    var = torch.where(var > CONSTANT_COLUMN_EPS * eps * second, var, torch.zeros_like(var))
    floor, lift = variance_floor(min_variance, scale, d, var.dtype, var.device)
    if lift is not None:
        mean = mean * lift
        var = var * (lift * lift)
    var = torch.maximum(var, floor)
    quarter_logdet = 0.25 * var.log().sum(1)  # [C]: 1/4 log det diag(v_c)
    # At least 8 blocks when there are classes enough: later blocks skip the pairs already done.
    step = max(1, min(-(-c // 8), budget // max(1, 3 * c * d * itemsize(sums.dtype))))
    total = torch.zeros((), dtype=sums.dtype, device=sums.device)
    index = torch.arange(c, device=sums.device)
    for start in range(0, c, step):  # blocks of classes, to bound memory and skip j < i
        rows, cols = slice(start, min(start + step, c)), slice(start, c)
        avg = var[rows, None, :] + var[None, cols, :]
        avg.mul_(0.5)  # [B, C', D]: the average of the two diagonal covariances
        gap = mean[rows, None, :] - mean[None, cols, :]
        gap.square_().div_(avg)
        # Bhattacharyya distance between N(mu_i, diag v_i) and N(mu_j, diag v_j).
        dist = gap.sum(-1).div_(8) + 0.5 * avg.log_().sum(-1)
        dist -= quarter_logdet[rows, None] + quarter_logdet[None, cols]
        pair = present[rows, None] & present[None, cols] & (index[rows, None] < index[None, cols])
        total += torch.where(pair, torch.exp(-dist), torch.zeros_like(dist)).sum()
    return -2 * total


def gbc_compute(state: ClassMoments, min_variance: float) -> Tensor:
    """GBC from its state: class counts, sums and sums of squares, in the units of ``state.scale``."""
    assert state.squares is not None, "GBC's moments are summed with squares=True"
    return gbc_from_moments(state.counts, state.sums, state.squares, min_variance, scale=state.scale)


def gbc(
    features: Any,
    labels: Any,
    *,
    min_variance: float = 1e-4,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
) -> Tensor:
    """GBC (Pándy et al., CVPR 2022): minus the summed Gaussian Bhattacharyya coefficients.

    Each class c present in ``labels`` is a Gaussian N(mu_c, diag(v_c)) with
    the class mean and the per-dimension variance (normalised by n_c, floored
    at ``min_variance`` as in the published code). The score is
    -sum_{i != j} exp(-D_B(i, j)) over ordered pairs of classes (each
    unordered pair counts twice, as in the paper), with the Bhattacharyya
    distance D_B(i, j) = 1/8 sum_k (mu_ik - mu_jk)^2 / v_k + 1/2 sum_k
    log(v_k / sqrt(v_ik v_jk)), v_k = (v_ik + v_jk) / 2.

    Args:
        features: [N, D] tensor or numpy array, any device.
        labels: [N] class ids.
        min_variance: floor of the class variances (default 1e-4, as
            published); it is absolute, so it assumes features of unit scale.
        dtype: compute precision (default float64).
        device: compute device (default: the inputs' device).

    Returns:
        0-dim tensor in [-C (C - 1), 0]. Larger (closer to 0) is better.
        Invariant to shifting the features. A ValueError when the floor,
        relative to the features' magnitude, underflows the compute dtype.
    """
    dtype, device = _resolve(dtype, device)
    min_variance = positive_float(min_variance, "min_variance")
    inputs = prepare(features, labels, regression=False, num_classes=None, device=device)
    _check_classes(inputs, lambda c, d: c * c, "GBC's class pairs (C x C)")
    f = inputs.features
    with torch.no_grad():
        # Diagonal covariances: one power of two per column (the floor is scaled with it).
        frame = make_frame(f, dtype, per_column=True, power=2)
        moments = _moments(f, inputs.targets, inputs.num_columns, dtype, frame, squares=True)  # no held form
        return _finite(gbc_compute(moments, min_variance), "GBC", frame.size)
