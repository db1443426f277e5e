"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it over ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide shared datasets
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def json_text(obj, indent: int | None = None) -> str:
    """Strict JSON: NaN and infinities (an undefined CI, a diverged score) become null, which
    every parser reads; Python's default writes the invalid tokens NaN and Infinity."""
    def finite(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        return o
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as strict JSON (see :func:`json_text`), atomically."""
    with atomic_open(path, "w") as f:
        f.write(json_text(obj, indent=2) + "\n")


# A temp file untouched this long belongs to a writer that died (kill -9 mid-download):
# live writers (downloads with a 60 s read timeout, checkpoints) touch theirs far sooner.
STALE_TEMP_S = 600


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set it straight back, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (a ``.pymeta.lock`` file in it) for the block;
    raises ``RuntimeError`` at once if another process holds it. The kernel drops the lock
    when its holder exits, however it exits."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded
        yield
        return
    with open(directory / ".pymeta.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{directory} is in use by another process ({what}); wait for "
                               f"it to finish or choose another directory") from None
        yield
