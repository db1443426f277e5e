"""Warnings attributed to the user's line, whichever path inside pymeta raised them."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep  # pymeta/


def warn_caller(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside pymeta: the user's call (a
    fixed ``stacklevel`` is right for one call path only)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
