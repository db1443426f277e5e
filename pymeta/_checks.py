"""Argument checks shared by every layer (data, nn, learners, engine)."""
from __future__ import annotations

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
