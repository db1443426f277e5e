"""Checkpoints: written atomically, versioned, loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .._atomic import atomic_open

FORMAT = "pymeta-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` plus the format tag and a digest of everything in it; a crash
    mid-write leaves the old file intact."""
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_open(path, "wb") as f:
        torch.save({**state, "digest": _digest(state)}, f)


def _digest(state) -> str:
    """SHA-256 of a checkpoint's contents: torch.load checks no checksum, so a flipped bit
    in a weight would otherwise load silently."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"tensor {t.dtype} {list(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}|".encode())
            for key in sorted(x, key=repr):
                h.update(f"{key!r}:".encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}|".encode())
            for item in x:
                walk(item)
        else:
            h.update(f"{x!r}|".encode())

    walk(state)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a run directory, not a checkpoint: pass "
                                f"{path / 'best.pt'} (or last.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a readable pymeta checkpoint: truncated, corrupt or "
                         f"another kind of file ({type(e).__name__}{': ' * bool(detail)}"
                         f"{detail})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pymeta checkpoint")
    version = state.get("version", 0)
    if type(version) is not int:
        raise ValueError(f"{path} is malformed: its format version is {version!r}")
    if version > VERSION:
        raise ValueError(f"{path} has checkpoint format {version}; this pymeta reads up to "
                         f"{VERSION}: upgrade pymeta")
    digest = state.pop("digest", None)  # older checkpoints have none
    if digest is not None and digest != _digest(state):
        raise ValueError(f"{path} is corrupt: its contents no longer match the digest saved "
                         f"with them")
    return state
