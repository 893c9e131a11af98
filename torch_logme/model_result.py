"""The result of ranking models, and how its peak memory is measured.

:class:`ModelRanking` is a :class:`~torch_logme.ranking.Ranking` whose rows,
:class:`ModelEntry`, also hold every layer's scores, the layer chosen, the
time and the peak memory. :class:`PeakMemory` measures that peak, cheaply:
one allocator statistic on CUDA, the kernel's peak resident set size on a
Linux CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import ranking

__all__ = ["ModelEntry", "ModelRanking", "PeakMemory"]


# -- peak memory ---------------------------------------------------------------------------------------------

def rss_kib(field_name: str) -> Optional[int]:
    """A size in KiB from /proc/self/status ("VmRSS", "VmHWM"); None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory while a model is built, run and scored, above what was in use at the start.

    On CUDA: ``torch.cuda.max_memory_allocated`` of the model's device (the
    caching allocator's peak of live tensors; its statistics are reset at
    the start). On the CPU (Linux): the process's peak resident set size
    (``VmHWM``), reset at the start through ``/proc/self/clear_refs``; it
    counts everything the process touched (the model, activations, the
    loader's buffers in this process), at page granularity. Elsewhere: not
    measured (None).
    """

    HOW = {
        "cuda": "CUDA: torch.cuda.max_memory_allocated above the start",
        "cpu": "CPU: the process's peak resident set size (VmHWM) above the start",
    }

    def __init__(self, device: Optional[torch.device]) -> None:
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.cuda_start: Optional[Dict[torch.device, int]] = None
        self.rss_start: Optional[int] = None

    def start(self) -> None:
        if torch.cuda.is_available():
            # The model's device is known only once it is built: without device=, watch the current CUDA device.
            devices = [self.cuda] if self.cuda is not None else [torch.device("cuda", torch.cuda.current_device())]
            self.cuda_start = {}
            for device in devices:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                self.cuda_start[device] = torch.cuda.memory_allocated(device)
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set size
            self.rss_start = rss_kib("VmRSS")
        except OSError:
            self.rss_start = None

    def peak(self, device: torch.device) -> Tuple[Optional[int], str]:
        """(bytes, how it was measured) for a model on ``device``."""
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            if self.cuda_start is not None and device in self.cuda_start:
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_allocated(device) - self.cuda_start[device], "cuda"
            return None, "cuda"
        if device.type == "cpu" and self.rss_start is not None:
            high = rss_kib("VmHWM")
            if high is not None:
                return max(high - self.rss_start, 0) * 1024, "cpu"
        return None, device.type


# -- the result ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry(ranking.RankedModel):
    """One model of a :class:`ModelRanking`.

    Attributes (besides ``rank``, ``name`` and ``scores``, the values of
    the layer chosen, or the means over layers):
        layer: the label of the layer chosen ("mean" with ``aggregate="mean"``).
        layers: every scored layer's values, label -> score -> value.
        seconds: wall time of the model's build, forward passes and scoring.
        peak_memory: bytes, see :class:`ModelRanking` ``memory``; None when not measured.
        features_from: "forward" (a forward pass ran) or "cache" (the feature cache served).
        collected_bytes: bytes of features kept for the scores that cannot stream (0 when all stream).
    """

    layer: str = ""
    layers: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seconds: float = math.nan
    peak_memory: Optional[int] = None
    features_from: str = "forward"
    collected_bytes: int = 0


def _clean(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


def mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _table(header: List[str], rows: List[List[str]], left: Sequence[int]) -> List[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(header), "-" * len(line(header))] + [line(r) for r in rows]


@dataclass(frozen=True)
class ModelRanking(ranking.Ranking):
    """A :class:`~torch_logme.ranking.Ranking` of models, with every layer's scores, time and memory.

    ``ranking.models``, ``best``, iteration and indexing work as for a
    ranking of features; the rows are :class:`ModelEntry`. ``aggregate``
    says how a model's layers made its row ("best": the layer with the best
    ``selected_by`` score, "last", or "mean"); ``memory`` how peak memory
    was measured. ``to_dict()`` / ``to_json()`` hold everything;
    ``to_pandas()`` gives a DataFrame when pandas is installed.
    """

    aggregate: str = "best"
    selected_by: str = ""
    memory: Tuple[str, ...] = ()

    @property
    def best_layer(self) -> str:
        """The layer chosen for the best model."""
        return self.entries[0].layer  # type: ignore[attr-defined]

    def to_dict(self) -> Dict[str, Any]:
        """The ranking's dict (as for features) with, per model: layer, layers, seconds, peak_memory_bytes, ...

        NaN scores become None (JSON null).
        """
        out = super().to_dict()
        out.update(aggregate=self.aggregate, selected_by=self.selected_by, memory=list(self.memory))
        for row, e in zip(out["ranking"], self.entries):
            assert isinstance(e, ModelEntry)
            row.update(
                layer=e.layer,
                layers={label: {s: _clean(v) for s, v in values.items()} for label, values in e.layers.items()},
                seconds=e.seconds, peak_memory_bytes=e.peak_memory, features_from=e.features_from,
                collected_bytes=e.collected_bytes,
            )
        return out

    def to_pandas(self, per_layer: bool = False) -> Any:
        """A pandas DataFrame: one row per model (rank order), or with ``per_layer=True`` one per (model, layer).

        Raises ImportError (naming the fix) when pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Ranking.to_pandas needs pandas: pip install pandas (or use to_dict / to_json)") from None
        rows = []
        for e in self.entries:
            assert isinstance(e, ModelEntry)
            common = {"rank": e.rank, "model": e.name}
            extra = {"seconds": e.seconds, "peak_memory_bytes": e.peak_memory, "features_from": e.features_from}
            if per_layer:
                rows += [{**common, "layer": label, "chosen": label == e.layer, **values, **extra}
                         for label, values in e.layers.items()]
            else:
                rows.append({**common, "layer": e.layer, **e.scores, **extra})
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        first = self.scores[0]
        direction = "larger is better" if ranking.SCORES[first].larger_is_better else "smaller is better"
        how = {"best": f"the best by {self.selected_by}", "last": "the last", "mean": "the mean over layers"}
        out = [f"ranked by {first} ({direction}), best first; each model's layer: {how[self.aggregate]}"]
        header = ["rank", "model", "layer", *self.scores, "seconds", "peak MiB", "features"]
        rows = []
        for e in self.entries:
            assert isinstance(e, ModelEntry)
            rows.append([str(e.rank), e.name, e.layer, *(f"{e.scores.get(s, math.nan):.6g}" for s in self.scores),
                         f"{e.seconds:.2f}", mib(e.peak_memory), e.features_from])
        out += _table(header, rows, left=(1, 2))
        if any(len(e.layers) > 1 for e in self.entries):  # type: ignore[attr-defined]
            out += ["", "scores per layer (* the layer chosen):"]
            layer_rows = []
            for e in self.entries:
                for label, values in e.layers.items():  # type: ignore[attr-defined]
                    mark = " *" if label == e.layer else ""  # type: ignore[attr-defined]
                    layer_rows.append([e.name, label + mark,
                                       *("" if s not in values else f"{values[s]:.6g}" for s in self.scores)])
            out += _table(["model", "layer", *self.scores], layer_rows, left=(0, 1))
        out += [f"note: {note}" for note in self.notes]
        out += [f"peak memory: {how_measured}" for how_measured in self.memory]
        return "\n".join(out)
