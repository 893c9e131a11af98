"""A directory of pooled layer features, reused when the model and the data are the same as before.

``rank_models(models, data, cache=DIR)`` stores, for every model and layer,
the features its forward passes gave after pooling ([N, D], one ``.npy``
file), under a key made of:

- the model's fingerprint: its class, and for every entry of its
  ``state_dict`` the name, shape, dtype and values (all the bytes of a
  tensor of up to 65,536 values; above that its float64 sum and 1,024
  values evenly spaced through it, so that fingerprinting a large model
  costs one reduction per tensor, not a copy of its weights);
- the data's fingerprint: the number of batches, the batch sizes, every
  label, and the inputs of the first batch (read once per call, in one
  iteration over ``data`` that runs no model; texts by their characters,
  images such as PIL's by their pixels);
- what defines the features: the layer, the pooling (a callable by its
  name and code, not the values it closes over), the autocast dtype, and
  the model's input preparation (a zoo model's tokenizer or transform, by
  its ``cache_key``).

A model whose every layer is in the cache is scored from the files, with
no forward pass; any other model runs its pass and its files are written
(replacing those of an older key). Files are written whole or not at all
(written under a temporary name, renamed when complete). Under
torch.distributed every rank keeps the files of its own shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DataPrint", "FeatureCache", "NpyWriter", "data_fingerprint", "model_fingerprint"]

_WHOLE = 1 << 16  # tensors up to this many values are hashed whole
_SAMPLES = 1024  # values read from a larger tensor, evenly spaced


def _update_with_tensor(digest: Any, t: Tensor) -> None:
    digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    t = t.detach()
    if t.numel() <= _WHOLE:
        digest.update(_tensor_bytes(t))
        return
    flat = t.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, _SAMPLES, device=flat.device).long()
    summary = torch.cat([flat.to(torch.float64).sum().reshape(1), flat[index].to(torch.float64)])
    digest.update(_tensor_bytes(summary))


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's class and state (see the module's docstring)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    with torch.no_grad():
        for name, value in model.state_dict().items():
            digest.update(f"|{name}|".encode())
            if isinstance(value, Tensor):
                _update_with_tensor(digest, value)
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


def _update_with_value(digest: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        _update_with_tensor(digest, value)
    elif isinstance(value, np.ndarray):
        _update_with_tensor(digest, torch.from_numpy(np.ascontiguousarray(value)))
    elif hasattr(value, "__array_interface__"):  # e.g. a PIL image: its pixels, not its repr (which has an address)
        digest.update(f"{type(value).__name__}|".encode())
        _update_with_tensor(digest, torch.from_numpy(np.array(value)))
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"{key}=".encode())
            _update_with_value(digest, value[key])
    elif isinstance(value, (tuple, list)):
        digest.update(f"[{len(value)}]".encode())
        for item in value:
            _update_with_value(digest, item)
    else:
        digest.update(repr(value).encode())


@dataclass
class DataPrint:
    """The data's fingerprint, and its labels per batch (on the CPU), which a cached model is scored with."""

    digest: str
    labels: List[Tensor]

    @property
    def num_samples(self) -> int:
        return sum(int(y.shape[0]) for y in self.labels)


def data_fingerprint(data: Iterable[Any], split: Any, rank: int = 0, world: int = 1) -> DataPrint:
    """Read ``data`` once, without a model: its labels, batch sizes and first inputs, hashed.

    Args:
        data: the batches.
        split: batch -> (inputs, labels).
        rank, world: this process's rank and the number of processes.
    """
    digest = hashlib.sha256(f"rank {rank} of {world}|".encode())
    labels: List[Tensor] = []
    for i, batch in enumerate(data):
        inputs, y = split(batch)
        y = torch.as_tensor(y).detach().to("cpu")
        if i == 0:
            _update_with_value(digest, inputs)
        digest.update(f"|{i}:".encode())
        digest.update(_tensor_bytes(y) + f"{y.dtype}{tuple(y.shape)}".encode())
        labels.append(y)
    return DataPrint(digest.hexdigest(), labels)


_HEADER = 128  # bytes: room for any [N, D] shape, and a multiple of 64 as the .npy format asks


class NpyWriter:
    """Rows [B, D] appended to a ``.npy`` file batch by batch; the file appears only when :meth:`close` runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self._file: Any = None
        self.rows = 0
        self.width: Optional[int] = None
        self.dtype: Optional[np.dtype] = None

    def append(self, rows: Tensor) -> None:
        array = rows.detach().to("cpu").contiguous().numpy()
        if self._file is None:
            self.width, self.dtype = array.shape[1], array.dtype
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.part, "wb")
            self._file.write(b"\0" * _HEADER)  # rewritten with the final shape by close()
        if array.shape[1] != self.width or array.dtype != self.dtype:
            raise ValueError(f"{self.path}: rows {array.shape} {array.dtype} after {self.width} {self.dtype}")
        self._file.write(array.tobytes())
        self.rows += array.shape[0]

    def _header(self) -> bytes:
        assert self.dtype is not None
        text = (f"{{'descr': {np.lib.format.dtype_to_descr(self.dtype)!r}, 'fortran_order': False, "
                f"'shape': ({self.rows}, {self.width}), }}")
        room = _HEADER - 10
        if len(text) + 1 > room:
            raise ValueError(f"{self.path}: shape too large for the header")
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + (text.ljust(room - 1) + "\n").encode("latin1")

    def close(self) -> None:
        """Write the header and move the file into place."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()
        self._file = None
        os.replace(self.part, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.part.exists():
            self.part.unlink()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class FeatureCache:
    """The files of one cache directory (see the module's docstring)."""

    def __init__(self, root: Any, rank: int = 0, world: int = 1) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"cache must be a directory path (str or os.PathLike), got {type(root).__name__}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"cache={str(self.root)!r} exists and is not a directory")
        self.rank, self.world = rank, world

    def _folder(self, model: str) -> Path:
        folder = self.root / _safe(model)
        return folder / f"rank{self.rank}of{self.world}" if self.world > 1 else folder

    def paths(self, model: str, model_print: str, data_print: str, keys: Sequence[str],
              config: Dict[str, Any]) -> Dict[str, Path]:
        """The file of each key (a layer's label, or "<label>.probs") for this model, data and config."""
        out = {}
        for key in keys:
            blob = json.dumps({"model": model_print, "data": data_print, "layer": key, **config, "version": 1},
                              sort_keys=True)
            out[key] = self._folder(model) / f"{_safe(key)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npy"
        return out

    @staticmethod
    def load(paths: Dict[str, Path], num_samples: int) -> Optional[Dict[str, np.ndarray]]:
        """Every key's features [N, D] (memory-mapped), or None when any file is missing or has other N."""
        if not all(p.is_file() for p in paths.values()):
            return None
        arrays = {}
        for key, path in paths.items():
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                return None  # unreadable: the pass rewrites it
            if array.ndim != 2 or array.shape[0] != num_samples:
                return None
            arrays[key] = array
        return arrays

    @staticmethod
    def writers(paths: Dict[str, Path]) -> Dict[str, NpyWriter]:
        return {key: NpyWriter(path) for key, path in paths.items()}

    @staticmethod
    def drop_stale(paths: Dict[str, Path]) -> None:
        """Remove the files of these keys written under another fingerprint."""
        for path in paths.values():
            stem = path.name[: -len("-0123456789abcdef.npy")]
            pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{16}\.npy")
            for other in path.parent.glob(f"{stem}-*.npy"):
                if other != path and pattern.fullmatch(other.name):
                    other.unlink(missing_ok=True)
