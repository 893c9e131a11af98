"""Input checks: turn user features and targets into validated tensors.

Every check runs before the Gram matrix (the first heavy step). The checks
that need the data's values (NaN/Inf, all-zero features, label range) are
reduced on the device and read back in a single transfer, so validation costs
one host sync however many things it checks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ._validators import boolean, positive_int


@dataclass(frozen=True)
class Inputs:
    """Validated inputs on the compute device.

    features: [N, D], the caller's tensor (same dtype) or a device copy of it.
    targets: int64 labels [N] (classification) or floating targets [N, C].
    num_columns: C, the number of LogME columns (classes or targets).
    magnitude: max |features|, when the values were checked (else None).
    """

    features: Tensor
    targets: Tensor
    num_columns: int
    classification: bool
    magnitude: Optional[float] = None

    @property
    def num_samples(self) -> int:
        return self.features.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]


def as_tensor(x: Any, name: str) -> Tensor:
    """A numpy array or tensor as a tensor, sharing memory where possible."""
    if isinstance(x, Tensor):
        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}")
        if x.is_meta:
            raise ValueError(f"{name} on the meta device hold no values; pass tensors with data")
        return _widen_unsigned(x.detach())
    if isinstance(x, np.ma.MaskedArray):
        # torch.from_numpy would read the data under the mask and drop the mask without a word.
        raise ValueError(
            f"{name}: masked arrays are not supported; fill or drop the masked entries "
            "(numpy.ma: .filled(value) or .compressed())"
        )
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} must hold real numbers (bool, int or float), got numpy dtype {x.dtype}"
            )
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if any(step < 0 for step in x.strides):  # torch has no negative strides
            x = np.ascontiguousarray(x)
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap_mode, say) are fine: nothing is written to them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return _widen_unsigned(torch.from_numpy(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _widen_unsigned(x: Tensor) -> Tensor:
    """uint16/32/64 as int64 or float64: torch has few ops for them, and they are numbers like any int.

    uint16/32 fit int64 exactly. uint64 becomes float64 (exact to 2**53, as the
    float64 sums would round it anyway): int64 would wrap values from 2**63 to
    negative numbers, and telling them apart would cost a host read.
    """
    if x.dtype in (torch.uint16, torch.uint32):
        return x.to(torch.int64)
    if x.dtype == torch.uint64:
        return x.to(torch.float64)
    return x


def source_labels(predictions: Any, *, check: bool = True) -> Tensor:
    """Hard source labels [N] from source-class probabilities or logits [N, Cs]; labels [N] pass through.

    ``check`` (one host read) rejects non-finite predictions, whose argmax
    would be an arbitrary class.
    """
    p = as_tensor(predictions, "source_labels")
    if p.dim() != 2 or p.shape[1] == 0:
        return p
    if check and p.is_floating_point() and not bool(torch.isfinite(p).all()):
        raise ValueError("source predictions contain NaN or inf; expected finite probabilities or logits")
    return p.argmax(1)


def _check_features(features: Tensor, min_samples: int) -> None:
    if features.dim() != 2:
        raise ValueError(
            f"features must be 2-D [N, D] (samples x feature dims), got shape {tuple(features.shape)}"
        )
    if features.is_complex() or not (features.is_floating_point() or features.dtype in _INT_DTYPES):
        raise TypeError(f"features must hold real numbers (float or int), got {features.dtype}")
    n, d = features.shape
    if n < min_samples:
        what = "the score needs at least 2 samples" if min_samples == 2 else "a batch needs at least 1 sample"
        raise ValueError(f"{what}, got N = {n}")
    if d < 1:
        raise ValueError("features have D = 0 feature dimensions; expected D >= 1")


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _shape_targets(targets: Tensor, n: int, regression: bool) -> Tensor:
    if targets.is_complex() or not (targets.is_floating_point() or targets.dtype in _INT_DTYPES):
        kind = "regression targets" if regression else "class labels"
        raise TypeError(f"{kind} must be numeric (int or float), got {targets.dtype}")
    if targets.shape[:1] != (n,):
        raise ValueError(
            f"features and targets disagree on N: features have {n} rows, "
            f"targets have shape {tuple(targets.shape)}"
        )
    if regression:
        if targets.dim() == 1:
            return targets.unsqueeze(1)
        if targets.dim() == 2 and targets.shape[1] >= 1:
            return targets
        raise ValueError(f"regression targets must be [N] or [N, C], got shape {tuple(targets.shape)}")
    if targets.dtype == torch.bool:
        targets = targets.to(torch.int64)
    if targets.dim() == 2 and targets.shape[1] == 1:
        return targets.reshape(n)
    if targets.dim() != 1:
        raise ValueError(
            f"class labels must be 1-D [N] integer ids, got shape {tuple(targets.shape)} "
            "(for multi-label or float targets use regression=True)"
        )
    return targets


def prepare(
    features: Any,
    targets: Any,
    *,
    regression: bool,
    num_classes: Optional[int],
    device: Optional[torch.device],
    batch: bool = False,
    check_values: bool = True,
) -> Inputs:
    """Validate features [N, D] and targets, move them to the compute device.

    Raises TypeError / ValueError naming the problem before any heavy work.
    The caller's tensors are never written to. ``batch=True`` checks one
    batch of a stream: one sample is enough and an all-zero batch is fine.
    ``check_values=False`` skips the checks that read values back to the
    host (NaN/Inf, label range); it needs ``num_classes`` for labels.
    """
    boolean(regression, "regression")
    if num_classes is not None:
        if regression:
            raise ValueError("num_classes applies to classification only; got regression=True")
        positive_int(num_classes, "num_classes")
    f = as_tensor(features, "features")
    y = as_tensor(targets, "targets")
    _check_features(f, 1 if batch else 2)
    y = _shape_targets(y, f.shape[0], regression)
    if device is not None:
        f = f.to(device)
        if f.is_meta:  # device="meta": the value checks below would fail inside torch
            raise ValueError("features on the meta device hold no values; pass a device with data")
    y = y.to(f.device)
    if regression:
        magnitude = None
        if check_values:
            _, magnitude = _check_values(f, y, regression, num_classes, require_nonzero=not batch)
        return Inputs(f, y, y.shape[1], False, magnitude)
    if check_values or num_classes is None:
        num_columns, magnitude = _check_values(f, y, regression, num_classes, require_nonzero=not batch)
    else:
        num_columns, magnitude = num_classes, None
    return Inputs(f, y.to(torch.int64), num_columns, True, magnitude)


def _check_values(
    f: Tensor, y: Tensor, regression: bool, num_classes: Optional[int], require_nonzero: bool
) -> "tuple[int, float]":
    """Check values in one host read; return (the number of columns, max |f|)."""
    # A few reductions, stacked and read back in a single transfer. One
    # aminmax pass answers both "finite?" (NaN and Inf reach the min or max)
    # and "all zero?": an order of magnitude cheaper than isfinite(f).all().
    low_f, high_f = torch.aminmax(f)
    finite = torch.isfinite(low_f) & torch.isfinite(high_f)  # always true for integers
    flags = [finite, (low_f != 0) | (high_f != 0)]
    if y.is_floating_point():
        flags.append(torch.isfinite(y).all())
        if not regression:
            flags.append((y == y.round()).all())
    values = [x.to(torch.float64) for x in flags]
    values.append(torch.maximum(low_f.abs(), high_f.abs()).to(torch.float64))
    if not regression:
        values += [v.to(torch.float64) for v in torch.aminmax(y)]
    read = torch.stack(values).tolist()
    magnitude = read[len(flags)]

    if not read[0]:
        raise ValueError("features contain NaN or Inf; expected finite values")
    if require_nonzero and not read[1]:
        raise ValueError("features are all zero (rank 0); expected at least one non-zero value")
    if y.is_floating_point() and not read[2]:
        kind = "regression targets" if regression else "class labels"
        raise ValueError(f"{kind} contain NaN or Inf")
    if regression:
        return y.shape[1], magnitude
    if y.is_floating_point() and not read[3]:
        raise ValueError("class labels must be integers (0, 1, 2, ...); got non-integer values")
    low, high = read[-2], read[-1]
    if low < 0:
        raise ValueError(f"class labels must be non-negative integers, got minimum {int(low)}")
    _check_int64(high, "class labels")
    if num_classes is None:
        return int(high) + 1, magnitude
    if high >= num_classes:
        raise ValueError(f"class label {int(high)} is out of range for num_classes={num_classes}")
    return num_classes, magnitude


def _check_int64(high: float, what: str) -> None:
    """Labels are int64 ids: a larger (float) label would wrap or overflow inside torch."""
    if high >= 2.0**63:
        raise ValueError(f"{what} must be integer-valued and within int64 (below 2**63), got a label of {high:g}")


# -- class counts out of proportion to the data -------------------------------

#: Largest state (in float64 bytes) that label ids may imply when they also imply
#: more classes than samples: 2 GiB. 1000 classes x 2048 features is 16 MB of sums.
CLASS_STATE_BUDGET = 2**31

#: An accumulator has not seen its N yet: there the class count must pass this instead.
STREAM_CLASS_LIMIT = 2**16


def check_class_count(
    num_classes: int, num_samples: Optional[int], elements: int, what: str, name: str = "class labels"
) -> None:
    """Raise ValueError, before anything is allocated, when label ids imply a class count out of proportion.

    Classes are max id + 1, so one stray id (10**9, a hash) sets the cost
    of every per-class state. The rule: more classes than samples (so at
    least C - N ids never occur; ``num_samples=None``, a stream, compares with
    ``STREAM_CLASS_LIMIT``) and a state of ``elements`` float64 values past
    ``CLASS_STATE_BUDGET``. Real data, where each class has a sample, never
    has C > N. Callers skip it when num_classes was given explicitly.
    """
    limit = STREAM_CLASS_LIMIT if num_samples is None else num_samples
    size = 8 * elements
    if num_classes <= limit or size <= CLASS_STATE_BUDGET:
        return
    than = f"{num_samples} samples" if num_samples is not None else f"{limit} (a stream's limit)"
    raise ValueError(
        f"{name} go up to {num_classes - 1}, which implies {num_classes} classes (more than {than}) and "
        f"about {size / 2**30:.3g} GiB for {what}; relabel the ids to 0..K-1 with "
        "torch_logme.relabel(labels), or pass num_classes explicitly (where the score takes it) to skip this check"
    )


def relabel(labels: Any) -> "tuple[Tensor, Tensor]":
    """Class ids [N] as (ids 0..K-1 [N], the K original ids in increasing order): ``ids[new] == labels``.

    Only the classes present count afterwards, however large the original ids.
    """
    y = _label_vector(labels, "labels", None, "")
    if y.is_floating_point() and y.numel():
        # One host read: NaN would become a class of its own and 0.5 an id, neither a class id.
        finite, integral = torch.stack([torch.isfinite(y).all(), (y == y.round()).all()]).tolist()
        if not finite:
            raise ValueError("labels contain NaN or Inf; expected integer class ids")
        if not integral:
            raise ValueError("labels must be integer class ids; got non-integer values")
    ids, inverse = torch.unique(y, sorted=True, return_inverse=True)
    return inverse.to(torch.int64), ids


# -- inputs of the scores that take no features (torch_logme.scores) ------------

#: Largest allowed |row sum - 1| of source probabilities (float16 softmax stays well inside).
PROB_SUM_TOL = 1e-2


def _check_label_values(checks: list, labels: "list[tuple[str, Tensor]]") -> list:
    """Append each label vector's integrality flag, min and max to ``checks``."""
    for _, y in labels:
        if y.is_floating_point():
            checks += [(y == y.round()).all(), torch.isfinite(y).all()]
        else:
            checks += [torch.ones((), dtype=torch.bool, device=y.device)] * 2
        checks += [y.min(), y.max()]
    return checks


def _read_label_checks(read: list, labels: "list[tuple[str, Tensor]]") -> "list[int]":
    """Raise for bad label values (as ``prepare`` does); return each vector's max + 1."""
    sizes = []
    for k, (name, _) in enumerate(labels):
        integral, finite, low, high = read[4 * k: 4 * k + 4]
        if not finite:
            raise ValueError(f"class labels ({name}) contain NaN or Inf")
        if not integral:
            raise ValueError(f"class labels ({name}) must be integers (0, 1, 2, ...); got non-integer values")
        if low < 0:
            raise ValueError(f"class labels ({name}) must be non-negative integers, got minimum {int(low)}")
        _check_int64(high, f"class labels ({name})")
        sizes.append(int(high) + 1)
    return sizes


def _label_vector(x: Any, name: str, n: Optional[int], other: str) -> Tensor:
    """A label tensor [N] (bool, int or integral float); N must equal ``n`` when given."""
    y = as_tensor(x, name)
    if y.dim() == 0:
        raise ValueError(f"{name} must be 1-D [N] integer ids, got a scalar")
    if n is not None and y.shape[0] != n:
        raise ValueError(
            f"{other} and {name} disagree on N: {other} have {n} rows, {name} have shape {tuple(y.shape)}"
        )
    return _shape_targets(y, y.shape[0], regression=False)


def prepare_labels(labels: Any, name: str = "labels", *, device: Optional[torch.device] = None) -> "tuple[Tensor, int]":
    """Validate one vector of class ids [N] on its own: (int64 labels, max + 1), one host read."""
    y = _label_vector(labels, name, None, "")
    if y.shape[0] < 1:
        raise ValueError(f"{name} are empty; expected at least 1 label")
    if device is not None:
        y = y.to(device)
    checked = [(name, y)]
    read = torch.stack([c.to(torch.float64) for c in _check_label_values([], checked)]).tolist()
    (num_classes,) = _read_label_checks(read, checked)
    return y.to(torch.int64), num_classes


def prepare_probabilities(
    source_probs: Any, target_labels: Any, *, device: Optional[torch.device]
) -> "tuple[Tensor, Tensor, int]":
    """Validate source-class probabilities [N, Cs] and target labels [N] (for LEEP).

    Returns (probs on the compute device, int64 labels, number of target
    classes = max label + 1). Same errors as ``prepare`` for shapes, NaN/Inf
    and labels; also rejects negative probabilities and rows that do not sum
    to 1 (logits passed by mistake), all in one host read.
    """
    p = as_tensor(source_probs, "source_probs")
    if p.dim() != 2:
        raise ValueError(
            f"source_probs must be 2-D [N, Cs] (samples x source classes), got shape {tuple(p.shape)}"
        )
    if p.is_complex() or not (p.is_floating_point() or p.dtype in _INT_DTYPES):
        raise TypeError(f"source_probs must hold real numbers (float or int), got {p.dtype}")
    n, cs = p.shape
    if n < 2:
        raise ValueError(f"LEEP needs at least 2 samples, got N = {n}")
    if cs < 1:
        raise ValueError("source_probs have Cs = 0 source classes; expected Cs >= 1")
    y = _label_vector(target_labels, "target_labels", n, "source_probs")
    if device is not None:
        p = p.to(device)
    y = y.to(p.device)
    row_sums = p.sum(1, dtype=torch.float64)
    checks = [
        # A NaN or Inf anywhere makes its row sum NaN or Inf: no pass over p for finiteness
        # alone (only huge finite entries overflow a row sum too; they are told apart below).
        torch.isfinite(row_sums).all(),
        p.min(),
        (row_sums - 1).abs().max(),  # the largest deviation of a row sum from 1
    ]
    labels = [("target_labels", y)]
    read = torch.stack([c.to(torch.float64) for c in _check_label_values(checks, labels)]).tolist()
    if not read[0] and not bool(torch.isfinite(p).all()):
        raise ValueError("source_probs contain NaN or Inf; LEEP needs finite probabilities")
    if read[1] < 0:
        raise ValueError(f"source_probs must be probabilities in [0, 1], got a negative value {read[1]:g}")
    if not read[0] or read[2] > PROB_SUM_TOL:
        raise ValueError(
            f"source_probs rows must sum to 1 (softmax probabilities, not logits); "
            f"a row sum is off by {read[2]:.3g}"
        )
    (num_classes,) = _read_label_checks(read[3:], labels)
    return p, y.to(torch.int64), num_classes


def prepare_label_pair(
    source_labels: Any,
    target_labels: Any,
    *,
    device: Optional[torch.device],
    batch: bool = False,
    check_values: bool = True,
) -> "tuple[Tensor, Tensor, Optional[int], Optional[int]]":
    """Validate two label vectors [N] (for NCE): the source model's hard labels and the target's.

    Returns (source int64, target int64, source classes, target classes) on
    the compute device; the class counts are max + 1, read in one host
    transfer, or None when ``check_values=False`` skips that read.
    ``batch=True`` accepts a single sample (one batch of a stream).
    """
    s = _label_vector(source_labels, "source_labels", None, "")
    n = s.shape[0]
    t = _label_vector(target_labels, "target_labels", n, "source_labels")
    minimum = 1 if batch else 2
    if n < minimum:
        raise ValueError(f"NCE needs at least {minimum} sample{'s' if minimum > 1 else ''}, got N = {n}")
    if device is not None:
        s = s.to(device)
    t = t.to(s.device)
    if not check_values:
        return s.to(torch.int64), t.to(torch.int64), None, None
    labels = [("source_labels", s), ("target_labels", t)]
    read = torch.stack([c.to(torch.float64) for c in _check_label_values([], labels)]).tolist()
    cs, ct = _read_label_checks(read, labels)
    return s.to(torch.int64), t.to(torch.int64), cs, ct
