"""Scores normalised across a pool: the terms of successive evaluations, combined across all of them.

A score whose published code normalises it across the candidate models
(``ScoreSpec.terms``, ``ScoreSpec.combine``) has no value on its own. Where
candidates arrive one at a time (the epochs of checkpoint selection, of a
Lightning run), the pool is every evaluation so far: each new one is
combined with the earlier ones, as ``rank_models`` combines models.
"""
from __future__ import annotations

from typing import Any, List

import torch
from torch import Tensor


class TermPool:
    """The terms [T] of every evaluation so far of one pooled score; ``terms`` is a list of lists of floats."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.terms: List[List[float]] = []

    def combined(self, value: Tensor) -> List[float]:
        """The scores of the pool with ``value`` ([T]) added last, without adding it."""
        assert self.spec.combine is not None  # a pooled spec has one
        pool = torch.tensor(self.terms + [[float(v) for v in value.tolist()]], dtype=torch.float64)
        return [float(v) for v in self.spec.combine(pool).tolist()]

    def add(self, value: Tensor) -> List[float]:
        """Add ``value`` ([T]) to the pool; the scores of every evaluation, this one last."""
        out = self.combined(value)
        self.terms.append([float(v) for v in value.tolist()])
        return out
