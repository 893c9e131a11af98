"""Shared test settings: the one list of devices and dtypes every test uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]


def make_features(n: int, d: int, c: int, seed: int = 0, scale: float = 1.0):
    """Gaussian features [n, d] whose mean depends on the label, and labels [n] in 0..c-1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    centres = rng.standard_normal((max(c, 1), d))
    feats = rng.standard_normal((n, d)) + 0.7 * centres[labels]
    return feats * scale, labels


def batches(n: int, sizes: list) -> list:
    """Split range(n) into consecutive slices of the given sizes (cycled)."""
    out, start, i = [], 0, 0
    while start < n:
        stop = min(start + sizes[i % len(sizes)], n)
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
