"""Checks of scalar options, shared by every entry point: one wording for each kind of mistake.

Each returns the checked value (normalised where that helps) or raises a
ValueError (a wrong value) or TypeError (a wrong type) that names the
option, what it accepts and what it got.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


def positive_int(
    value: Any, name: str, *, optional: bool = False, maximum: Optional[int] = None
) -> Optional[int]:
    """An int >= 1 (bool is not an int here), at most ``maximum`` when given; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def positive_float(value: Any, name: str) -> float:
    """A finite real > 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def boolean(value: Any, name: str) -> bool:
    """A bool (not merely truthy): a misplaced positional argument must not pass silently."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def one_of(value: T, name: str, choices: Sequence[T]) -> T:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
