"""The shared test table: for every registered score, how to make its inputs and its numpy reference.

``tests/test_harness.py`` runs every check over every entry here. A score
added to ``torch_logme.SCORES`` without an entry fails that harness.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np

from torch_logme import reference

from conftest import make_features


@dataclass(frozen=True)
class Entry:
    """make(n, d, c, seed) -> (inputs [n, d] float64, labels [n] int64); reference(inputs, labels) -> float."""

    make: Callable[[int, int, int, int], Tuple[np.ndarray, np.ndarray]]
    reference: Callable[[np.ndarray, np.ndarray], float]


def _features(n: int, d: int, c: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    return make_features(n, d, c, seed=seed)


def _probs(n: int, d: int, c: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Source-class probabilities [n, d] (a softmax of label-dependent logits) and labels [n]."""
    logits, labels = make_features(n, d, c, seed=seed)
    e = np.exp(2.0 * (logits - logits.max(1, keepdims=True)))
    return e / e.sum(1, keepdims=True), labels


def _logme_reference(f: np.ndarray, y: np.ndarray) -> float:
    return float(reference.LogME(use_numba=False).fit(f, y))


TABLE: Dict[str, Entry] = {
    "logme": Entry(_features, _logme_reference),
    "leep": Entry(_probs, reference.leep),
    "nce": Entry(_probs, lambda p, y: reference.nce(p.argmax(1), y)),
    "h_score": Entry(_features, reference.h_score),
    "regularized_h_score": Entry(_features, reference.regularized_h_score),
    "transrate": Entry(_features, reference.transrate),
    "gbc": Entry(_features, reference.gbc),
    "sfda": Entry(_features, reference.sfda),
    "ncti": Entry(_features, reference.ncti),
    "nleep": Entry(_features, reference.nleep),
    "etran": Entry(_features, reference.etran),
    "knn": Entry(_features, reference.knn),
    "parc": Entry(_features, reference.parc),
}
