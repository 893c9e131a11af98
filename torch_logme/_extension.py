"""Loading the compiled fixed-point op (csrc/) softly, and asking what it serves.

The op ``torch.ops.torch_logme.fixed_point`` lives in the optional library
``torch_logme._C``, built by setup.py when a compiler (and, for the CUDA
kernel, nvcc) is found. The package works without it: evidence.py then runs
the pure-torch fixed point. The library is loaded on first use, never at
import. A library that is absent is no surprise (a pure-Python install) and
stays silent; a library that is present but fails to load (e.g. built for
another torch) gives one short warning.

Setting ``TORCH_LOGME_DISABLE_EXTENSION=1`` at run time forces the
pure-torch path; it is read on every call, so it can be flipped in a
running process.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["DISABLE_ENV", "extension_available", "load", "load_error", "fixed_point_op"]

#: Run-time switch: "1" (or "true", "yes") forces the pure-torch fixed point.
DISABLE_ENV = "TORCH_LOGME_DISABLE_EXTENSION"
_OP_NAME = "torch_logme::fixed_point"
_LIBRARY = "torch_logme._C"

# None: not tried yet; then True (loaded) or False (absent or broken).
_loaded: Optional[bool] = None
_error: Optional[str] = None
# Device type -> whether the loaded library has a kernel for it.
_kernels: Dict[str, bool] = {}


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load() -> bool:
    """Load the compiled library once; True when its op is registered."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    _loaded = False
    spec = importlib.util.find_spec(_LIBRARY)
    if spec is None or spec.origin is None:
        _error = "not built (pure-Python install)"
        return False
    try:
        torch.ops.load_library(spec.origin)
        _register_fake()
    except Exception as err:  # any failure means: fall back to pure torch
        _error = f"failed to load {spec.origin}: {err}"
        warnings.warn(
            f"torch_logme: the compiled extension failed to load ({err}); using the pure-torch fixed point",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    _loaded = True
    return True


def load_error() -> Optional[str]:
    """Why the compiled library is not in use (None when it loaded or was not tried yet)."""
    return None if _loaded else _error


def extension_available(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether the compiled fixed point serves tensors on ``device`` (its type counts).

    True when the library is built and loaded, it has a kernel for that device
    type ("cpu", or "cuda" when built with nvcc), and
    ``TORCH_LOGME_DISABLE_EXTENSION`` is not set. Otherwise the pure-torch
    fixed point runs, with the same results.
    """
    if _disabled() or not load():
        return False
    return has_kernel(torch.device(device).type)


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library registered a kernel for ``device_type`` ("cpu", "cuda"), disabled or not."""
    if not load():
        return False
    if device_type not in _kernels:
        # Which kernels the library registered is fixed once it is loaded: ask the
        # dispatcher (a private torch API, with no public equivalent) once per device type.
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _kernels[device_type] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key)
    return _kernels[device_type]


def fixed_point_op(
    eigenvalues: Tensor,
    proj_sq: Tensor,
    target_sq: Tensor,
    whitened_sq: Optional[Tensor],
    outside_sq: Optional[Tensor],
    logdet_weights: Optional[Tensor],
    num_samples: int,
    num_features: int,
    max_iter: int,
    tol: float,
    strict: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Call the compiled op (see csrc/fixed_point.cpp for the schema).

    Returns alpha, beta, t, evidence (each [C], dtype of the inputs) and
    steps ([C], int64). Raises RuntimeError when the library is not loaded.
    """
    if not load():
        raise RuntimeError(f"torch_logme: the compiled extension is not available: {_error}")
    return torch.ops.torch_logme.fixed_point(
        eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, logdet_weights,
        num_samples, num_features, max_iter, tol, strict,
    )


def _register_fake() -> None:
    """Shapes-only kernel, so torch.compile and FakeTensor trace through the op."""
    # torch.library.register_fake is torch >= 2.4, the oldest torch supported
    # (setup.py): torch 2.3's impl_abstract registers a fake kernel that
    # torch.compile(fullgraph=True) cannot trace through.
    @torch.library.register_fake(_OP_NAME)
    def _fake(
        eigenvalues: Tensor,
        proj_sq: Tensor,
        target_sq: Tensor,
        whitened_sq: Optional[Tensor],
        outside_sq: Optional[Tensor],
        logdet_weights: Optional[Tensor],
        num_samples: int,
        num_features: int,
        max_iter: int,
        tol: float,
        strict: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        torch._check(eigenvalues.dim() == 1, lambda: "fixed_point: eigenvalues must be 1-D [k]")
        torch._check(proj_sq.dim() == 2, lambda: "fixed_point: proj_sq must be 2-D [C, k]")
        torch._check(proj_sq.shape[1] == eigenvalues.shape[0], lambda: "fixed_point: proj_sq must be [C, k]")
        torch._check(target_sq.dim() == 1, lambda: "fixed_point: target_sq must be 1-D [C]")
        torch._check(proj_sq.dtype == eigenvalues.dtype, lambda: "fixed_point: dtypes must match")
        c = proj_sq.shape[0]
        alpha, beta, t, evidence = (eigenvalues.new_empty(c) for _ in range(4))
        steps = eigenvalues.new_empty(c, dtype=torch.int64)
        return alpha, beta, t, evidence, steps
