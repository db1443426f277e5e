"""Argument checks shared by every layer (data, nn, learners, engine)."""
from __future__ import annotations


def check_count(who: str, name: str, value, alternatives: str = "", low: int = 1) -> int:
    """``value`` if it is an int >= ``low`` (not a bool), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{who}: {name} must be {kind}{alternatives}, got {value!r}")
    return value
