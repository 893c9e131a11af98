"""Scores normalised across a pool: the terms of successive evaluations, combined across all of them.

A score whose published code normalises it across the candidate models
(``ScoreSpec.terms``, ``ScoreSpec.combine``) has no value on its own. Where
candidates arrive one at a time (the epochs of checkpoint selection, of a
Lightning run), the pool is every evaluation so far: each new one is
combined with the earlier ones, as ``rank_models`` combines models.

``combine_terms`` and ``pooled_note`` are the one way every entry point
(``rank_models`` over features or over models, the demo, ``TermPool``)
combines a pool and says that it did.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import torch
from torch import Tensor


def combine_terms(spec: Any, terms: Sequence[Tensor]) -> List[float]:
    """A pooled score of each candidate, from every candidate's terms [T] (in the same order)."""
    assert spec.combine is not None  # a pooled spec has one
    pool = torch.stack([t.detach().to("cpu", torch.float64) for t in terms])
    return [float(v) for v in spec.combine(pool).tolist()]


def pooled_note(spec: Any, across: str, candidates: str) -> str:
    """The note an entry point prints for a pooled score: across what it combined, and that values depend on it."""
    return (f"{spec.name} combines its terms ({', '.join(spec.terms)}) across {across}: "
            f"its values change with the set of {candidates}")


class TermPool:
    """The terms [T] of every evaluation so far of one pooled score; ``terms`` is a list of lists of floats."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.terms: List[List[float]] = []

    def combined(self, value: Tensor) -> List[float]:
        """The scores of the pool with ``value`` ([T]) added last, without adding it."""
        return combine_terms(self.spec, [torch.tensor(t, dtype=torch.float64) for t in self.terms] + [value])

    def add(self, value: Tensor) -> List[float]:
        """Add ``value`` ([T]) to the pool; the scores of every evaluation, this one last."""
        out = self.combined(value)
        self.terms.append([float(v) for v in value.tolist()])
        return out
