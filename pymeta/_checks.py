"""Argument checks shared by every layer (data, nn, learners, engine)."""
from __future__ import annotations

import math
import operator


def check_count(who: str, name: str, value, alternatives: str = "", low: int = 1) -> int:
    """``value`` as an int (numpy's ints too) if it is one >= ``low``, else ``ValueError``
    naming it. A bool is no count: ``True`` must not read as 1."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < low:
        kind = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{who}: {name} must be {kind}{alternatives}, got {value!r}")
    return count


def check_positive_float(who: str, name: str, value) -> float:
    """``value`` as a float, or ``ValueError`` naming it unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive float, got {value!r}")
    return float(value)


def check_bool(who: str, name: str, value) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming it: a string like "False" from a
    config file must not silently read as True."""
    if not isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be True or False, got {value!r}")
    return value


def check_probability(who: str, name: str, value) -> float:
    """``value`` as a float, or ``ValueError`` naming it unless it is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{who}: {name} must be a probability in [0, 1), got {value!r}")
    return float(value)
