"""Checkpoints: written atomically, versioned, loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .._atomic import atomic_open

FORMAT = "pymeta-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` plus the format tag; a crash mid-write leaves the old file intact."""
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable pymeta checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pymeta checkpoint")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint format {state['version']}; this pymeta reads "
                         f"up to {VERSION}: upgrade pymeta")
    return state
