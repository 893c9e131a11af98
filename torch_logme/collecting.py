"""An accumulator that keeps every batch, for the scores that cannot stream.

A score such as LEEP or the k-nearest-neighbour accuracy needs every sample
at once: no fixed set of sums describes the data. So that such a score still
works wherever batches stream by (hooks, checkpoint selection, the
integrations), :class:`CollectingAccumulator` keeps the rows and labels of
every batch on their device and scores them all in ``compute()`` with the
score's functional form. It has the accumulators' API (``update / compute /
reset / merge / state_dict / load_state_dict / sync``), but its memory grows
with the number of samples: N x D values, where a streaming accumulator
keeps a fixed number. ``torch_logme.accumulator(name, ..., collect=True)``
builds one; without ``collect=True`` asking for a score that cannot stream
is an error, so that nobody holds a whole data set by accident.

Across processes the rows are gathered (``all_gather``), not summed: every
rank then scores the whole data set.
"""
from __future__ import annotations

import hashlib
import inspect
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ._checks import PROB_SUM_TOL, as_tensor, prepare
from ._options import compute_options
from ._validators import positive_int
from .streaming import OwnLock, _default_device, _distributed_ready

__all__ = ["CollectingAccumulator"]

#: Keywords the functional form takes that the accumulator sets itself.
_OWN = ("dtype", "device")


class CollectingAccumulator(OwnLock):
    """Keeps every batch's rows [B, D] and labels [B]; ``compute()`` scores them all at once.

    Args:
        spec: the registered score (a ``ScoreSpec``).
        num_features: D, the width of every batch; None takes it from the first.
        dtype: the compute precision of the score (default float64).
        device: the compute device of the score (the rows are kept as given,
            on their own device unless ``device``).
        sync_on_compute: ``compute()`` gathers every rank's rows first when
            a torch.distributed group is initialised.
        **options: the score's own options, as its functional form takes them.

    Raises:
        TypeError: an option the score does not take.
    """

    def __init__(
        self,
        spec: Any,
        num_features: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: Any = None,
        sync_on_compute: bool = True,
        **options: Any,
    ) -> None:
        self.spec = spec
        self.num_features = positive_int(num_features, "num_features", optional=True)
        self.compute_options = compute_options(dtype=dtype, device=device)
        self.sync_on_compute = sync_on_compute
        accepted = keywords(spec)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"{spec.name} takes no option {unknown[0]!r}; its options: {', '.join(accepted)}")
        self.options = dict(options)
        self._rows: List[Tensor] = []
        self._labels: List[Tensor] = []
        self._synced = False
        self._lock = threading.RLock()

    # -- batches -------------------------------------------------------------------
    def check_batch(self, inputs: Any, labels: Any, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
        """Run every check ``update`` runs on a batch (rows [B, D], labels [B]), adding nothing.

        Returns the rows and int64 labels on ``device`` (default: where they are).
        """
        return self._checked(inputs, labels, device, self.num_features if self.num_features is not None
                             else self._width())

    def _checked(self, inputs: Any, labels: Any, device: Optional[torch.device],
                 width: Optional[int]) -> Tuple[Tensor, Tensor]:
        x = as_tensor(inputs, self.spec.input)
        if x.dim() != 2 or (width is not None and x.shape[1] != width):
            expected = f"[B, {width}]" if width is not None else "[B, D]"
            raise ValueError(f"{self.spec.input} must be {expected} (batch x width), got shape {tuple(x.shape)}")
        checked = prepare(x, labels, regression=False, num_classes=None, device=device, batch=True)
        if self.spec.input == "probs":  # caught here, not at compute() after every later batch
            _check_probability_rows(checked.features)
        return checked.features, checked.targets

    def _width(self) -> Optional[int]:
        return self._rows[0].shape[1] if self._rows else None

    def update(self, inputs: Any, labels: Any) -> None:
        """Keep a batch: rows [B, D] (features, or source-class probabilities) and class ids [B]."""
        with self._lock:
            x, y = self.check_batch(inputs, labels, self.compute_options.device)
            # Copies: the caller may reuse its buffers for the next batch.
            with torch.no_grad():
                self._rows.append(x.detach().clone())
                self._labels.append(y.detach().clone())
            self._synced = False

    @property
    def num_samples(self) -> int:
        """N, the rows kept so far (on this rank)."""
        return sum(r.shape[0] for r in self._rows)

    def _data(self) -> Tuple[Tensor, Tensor]:
        if not self._rows:
            raise ValueError(f"{self.spec.name}: no batch yet; call update() first")
        device = self._rows[0].device
        return (torch.cat([r.to(device) for r in self._rows]), torch.cat([y.to(device) for y in self._labels]))

    def compute(self) -> Tensor:
        """The score of every batch kept (on every rank's rows, when distributed)."""
        with self._lock:
            if self.sync_on_compute and _distributed_ready():
                rows, labels = self._gathered(None)
            else:
                rows, labels = self._data()
            return self.spec.fn(rows, labels, dtype=self.compute_options.dtype,
                                device=self.compute_options.device, **self.options)

    def reset(self) -> None:
        """Forget every batch (keeps the settings)."""
        with self._lock:
            self._rows, self._labels, self._synced = [], [], False

    # -- several accumulators ---------------------------------------------------------
    def _config(self) -> Dict[str, Any]:
        return {"score": self.spec.name, "dtype": str(self.compute_options.dtype),
                "options": sorted((k, repr(v)) for k, v in self.options.items())}

    def merge(self, other: "CollectingAccumulator") -> "CollectingAccumulator":
        """Add another accumulator's batches to this one's (same score and settings)."""
        with self._lock:
            if not isinstance(other, CollectingAccumulator) or other._config() != self._config():
                theirs = other._config() if isinstance(other, CollectingAccumulator) else type(other).__name__
                raise ValueError(f"cannot merge {theirs} into {self._config()}")
            widths = {r.shape[1] for r in self._rows + other._rows}
            widths |= {w for w in (self.num_features, other.num_features) if w is not None}
            if len(widths) > 1:
                raise ValueError(f"cannot merge rows of widths {sorted(widths)}: every batch must have one width")
            self._rows = self._rows + [r.clone() for r in other._rows]
            self._labels = self._labels + [y.clone() for y in other._labels]
            self._synced = False
            return self

    def state_dict(self) -> Dict[str, Any]:
        """Copies of the rows and labels kept, plus the settings, for checkpoints."""
        with self._lock:
            if self._rows:
                rows, labels = self._data()
            else:
                rows, labels = torch.zeros(0, self.num_features or 0), torch.zeros(0, dtype=torch.int64)
            return {"rows": rows.clone(), "labels": labels.clone(), "config": self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore rows saved by ``state_dict`` (settings must match); checked whole before anything changes."""
        with self._lock:
            if not isinstance(state, Mapping):
                raise ValueError(f"a state_dict is a mapping, got {type(state).__name__}")
            if state.get("config") != self._config():
                raise ValueError(f"state_dict settings {state.get('config')} do not match {self._config()}")
            for key in ("rows", "labels"):
                if not isinstance(state.get(key), Tensor):
                    raise ValueError(f"state_dict has no tensor {key!r}")
            rows, labels = state["rows"], state["labels"]
            if rows.dim() != 2 or labels.shape != (rows.shape[0],):
                raise ValueError(
                    f"state_dict rows {tuple(rows.shape)} and labels {tuple(labels.shape)} do not match: "
                    "expected [N, D] and [N]"
                )
            if rows.shape[0]:  # checked against the width set up front, not the rows it replaces
                x, y = self._checked(rows, labels, self.compute_options.device, self.num_features)
                self._rows, self._labels = [x.clone()], [y.clone()]
            else:
                self._rows, self._labels = [], []
            self._synced = False

    def sync(self, group: Any = None) -> "CollectingAccumulator":
        """Replace the local rows with every rank's (in rank order); ``compute()`` then gathers no more.

        Every rank must call it; a second ``sync()`` with nothing new is a no-op on every rank.
        """
        with self._lock:
            if not _distributed_ready():
                raise RuntimeError("sync() needs an initialised torch.distributed process group")
            rows, labels = self._gathered(group)
            self._rows, self._labels = [rows], [labels]
            self._synced = True
            return self

    def _gathered(self, group: Any) -> Tuple[Tensor, Tensor]:
        """Every rank's rows and labels, concatenated in rank order.

        A first all_gather exchanges each rank's row count, width, dtype,
        settings and whether ``sync()`` has already made its rows the global
        ones, so that every rank takes the same branch: all synced, their own
        rows; a mismatch (or some synced and some not), the same ValueError
        on every rank instead of one rank waiting in a collective the others
        skip; else a second round gathers the rows.
        """
        dist = torch.distributed
        local = self._data() if self._rows else None
        device = local[0].device if local is not None else _default_device()
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        world = dist.get_world_size(group)
        # A digest that every process computes alike (str hashes are salted per process).
        digest = int.from_bytes(hashlib.sha256(repr(self._config()).encode()).digest()[:7], "little")
        dtype_code = -1 if local is None else _DTYPES.index(local[0].dtype)
        width = -1 if local is None else local[0].shape[1]
        header = torch.tensor([self.num_samples, width, dtype_code, digest, int(self._synced)], dtype=torch.int64,
                              device=device)
        headers = [torch.zeros_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=group)
        table = torch.stack(headers).cpu().tolist()
        present = [h for h in table if h[0] > 0]
        if len({h[3] for h in table}) > 1 or len({(h[1], h[2]) for h in present}) > 1:
            raise ValueError(
                f"{self.spec.name}: ranks disagree on settings, width or dtype of the rows "
                f"(count, width, dtype, settings, synced per rank: {table})"
            )
        if len({h[4] for h in table}) > 1:
            raise ValueError(
                f"{self.spec.name}: some ranks have synced their rows and others have new ones since "
                f"(synced per rank: {[h[4] for h in table]}); call sync() on every rank, or update every rank"
            )
        if not present:
            raise ValueError(f"{self.spec.name}: no rank has a batch yet; call update() first")
        if table[0][4]:  # every rank holds the global rows already
            return self._data()
        longest = max(h[0] for h in table)
        width, dtype = present[0][1], _DTYPES[present[0][2]]
        rows = torch.zeros(longest, width, dtype=dtype, device=device)
        labels = torch.zeros(longest, dtype=torch.int64, device=device)
        if local is not None:
            rows[: local[0].shape[0]] = local[0].to(device)
            labels[: local[1].shape[0]] = local[1].to(device)
        all_rows = [torch.zeros_like(rows) for _ in range(world)]
        all_labels = [torch.zeros_like(labels) for _ in range(world)]
        dist.all_gather(all_rows, rows, group=group)
        dist.all_gather(all_labels, labels, group=group)
        keep = [h[0] for h in table]
        return (torch.cat([r[:k] for r, k in zip(all_rows, keep)]),
                torch.cat([y[:k] for y, k in zip(all_labels, keep)]))


#: The dtypes rows can have after ``prepare`` (unsigned ones are widened), by their code in the header.
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def _check_probability_rows(p: Tensor) -> None:
    """ValueError unless the finite rows p [B, Cs] are probabilities (non-negative, summing to 1); one host read."""
    low, off = torch.stack([p.min().to(torch.float64), (p.sum(1, dtype=torch.float64) - 1).abs().max()]).tolist()
    if low < 0:
        raise ValueError(f"source probabilities must be in [0, 1], got a negative value {low:g}")
    if off > PROB_SUM_TOL:
        raise ValueError(
            f"source probability rows must sum to 1 (softmax outputs, not logits); a row is off by {off:.3g}"
        )


def keywords(spec: Any) -> Tuple[str, ...]:
    """The options a collecting accumulator of ``spec`` takes: its functional form's keywords, and its own."""
    params = inspect.signature(spec.fn).parameters.values()
    own = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _OWN]
    return tuple(own) + ("dtype", "device", "sync_on_compute")
