"""Shared reader plumbing: file trees (folder or zip), image decoding, the decoded-tensor cache."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from .._atomic import atomic_open
from .._warnings import warn_caller
from .classes import ImageClasses
from .paths import user_cache

T = TypeVar("T")
R = TypeVar("R")
CACHE_FORMAT = 2  # 2: with a content digest


class FileTree:
    """Read-only view of the files under a folder or inside a zip, by relative posix path.

    Zip members and folder files look alike, so every reader accepts both forms.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            self._files = _walk(self.path)
        elif self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path} is not a readable zip archive: {e}") from e
            self._files = sorted(n for n in self._zip.namelist() if _listed_member(n))
        else:
            raise FileNotFoundError(f"no such file or directory: {self.path}")

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    @property
    def files(self) -> list[str]:
        """Relative posix paths of all files, sorted."""
        return self._files

    def where(self, rel: str) -> str:
        """How to name a file in an error message."""
        return f"{self.path} (member {rel})" if self.is_zip else str(self.path / rel)

    def read(self, rel: str) -> bytes:
        if self._zip is None:
            return (self.path / rel).read_bytes()
        try:
            return self._zip.read(rel)
        except KeyError:
            raise FileNotFoundError(f"missing file {self.where(rel)}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise ValueError(f"cannot read {self.where(rel)}: {e}") from e

    def fingerprint(self) -> str:
        """Changes whenever the archive (or any file in the folder) is replaced or edited."""
        h = hashlib.sha256()
        if self._zip is not None:
            st = self.path.stat()
            h.update(f"zip|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            for rel in self._files:
                st = (self.path / rel).stat()
                h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "FileTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _listed_member(name: str) -> bool:
    """A zip member that :func:`_walk` would list for the extracted folder: a file, with no
    hidden part (macOS's ``._x.png`` resource forks) and not under ``__MACOSX/``."""
    return not (name.endswith("/") or name.startswith("__MACOSX/")
                or any(part.startswith(".") for part in name.split("/")))


def _walk(root: Path) -> list[str]:
    """Regular files under ``root`` (through symlinked folders, each real folder once; a
    FIFO or socket would block the read)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle, or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames
                if not f.startswith(".") and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(out)


def open_image(data: bytes, where: str):
    """Decode image bytes fully with PIL; any failure becomes a ValueError naming ``where``.
    Transparency is composited onto white."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ValueError(f"cannot decode image {where}: {e}") from e
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit: convert() would clip at 255
        pixels = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError(f"cannot use image {where}: floating-point pixels (mode F) have no "
                         f"fixed range; save it with 8- or 16-bit pixels")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # transparent pixels read as white paper, not as their (often black) colour values
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    return img


def parallel_map(fn: Callable[[T], R], items: Sequence[T], min_parallel: int = 512) -> list[R]:
    """``[fn(x) for x in items]`` on a small thread pool (PIL decoding releases the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    if workers < 2 or len(items) < min_parallel:
        return [fn(x) for x in items]
    size = -(-len(items) // (4 * workers))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(lambda c: [fn(x) for x in c], c) for c in chunks]
        return [r for f in futures for r in f.result()]


def cache_dir(cache: bool | str | os.PathLike | None, default: Path) -> Path | None:
    """``cache`` is True (use ``default``), False/None (no cache) or a directory."""
    if cache is None or cache is False:
        return None
    return default if cache is True else Path(cache).expanduser()


def default_cache_dir(beside_data: Path, name: str) -> Path:
    """``beside_data`` unless its location is read-only (a shared dataset folder); then the
    user's own cache, ``~/.cache/pymeta/<name>`` (see :func:`user_cache`; entries are keyed
    by their source)."""
    if _marked_read_only(beside_data):
        return user_cache() / name
    return beside_data


def cache_file(directory: Path, stem: str, key: dict, source: str) -> Path:
    """``<stem>-<source hash>-<key hash>.pt``. Saving a cache sweeps away older ones of the
    same source; the source's hash (its location) keeps two sources of one stem (two copies
    of an archive, two split files of a folder) from sweeping each other away."""
    where = hashlib.sha256(source.encode()).hexdigest()[:8]
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]
    return directory / f"{stem}-{where}-{digest}.pt"


def cache_load(path: Path, key: dict) -> ImageClasses | None:
    """The cached classes if ``path`` holds a readable cache for exactly ``key``, else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
            return None
        if blob.get("digest") != _digest(blob["images"], blob["offsets"], blob["names"]):
            raise ValueError("its contents do not match their digest")
        return ImageClasses(blob["images"], blob["offsets"], list(blob["names"]),
                            dict(blob["preprocessing"]))
    except Exception as e:  # truncated/corrupt/foreign file: rebuild rather than fail
        warn_caller(f"ignoring unreadable cache {path} ({type(e).__name__}: {e}); rebuilding it",
                    RuntimeWarning)
        return None


def _digest(images: torch.Tensor, offsets: torch.Tensor, names) -> str:
    """SHA-256 of a cache's contents: a flipped byte or a shifted class boundary must not
    load silently as data (about 10 ms for Omniglot's background set)."""
    h = hashlib.sha256()
    for t in (images, offsets):
        h.update(t.contiguous().numpy().data)
    h.update("\0".join(names).encode())
    return h.hexdigest()


def cache_save(path: Path, key: dict, classes: ImageClasses) -> None:
    """Write the cache atomically; an unwritable location only warns (the data is in memory)."""
    if _marked_read_only(path.parent):
        warn_caller(f"not writing cache {path}: its directory is marked read-only",
                    RuntimeWarning)
        return
    images, names = classes.images.contiguous(), list(classes.names)
    blob = {"format": CACHE_FORMAT, "key": key, "images": images, "offsets": classes.offsets,
            "names": names, "preprocessing": dict(classes.preprocessing),
            "digest": _digest(images, classes.offsets, names)}
    try:
        with atomic_open(path, "wb") as f:
            torch.save(blob, f)
    except OSError as e:
        warn_caller(f"could not write cache {path}: {e}", RuntimeWarning)
        return
    # Caches of older versions of the same source are dead weight now.
    for stale in path.parent.glob(f"{glob.escape(path.stem.rsplit('-', 1)[0])}-*.pt"):
        if stale != path and len(stale.stem) == len(path.stem):
            with contextlib.suppress(OSError):
                stale.unlink()


def _marked_read_only(directory: Path) -> bool:
    """True if the nearest existing ancestor has no write bits (honoured even when root)."""
    for d in (directory, *directory.parents):
        if d.exists():
            return not d.stat().st_mode & 0o222 or not os.access(d, os.W_OK)
    return False


def stack_classes(groups: Sequence[Sequence], names: list[str], preprocessing: dict,
                  image_shape: tuple) -> ImageClasses:
    """Build :class:`ImageClasses` from per-class lists of uint8 arrays ``image_shape``."""
    import numpy as np

    flat = [a for g in groups for a in g]
    arr = np.stack(flat) if flat else np.zeros((0, *image_shape), np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(arr.reshape(len(flat), *image_shape)))
    return ImageClasses.from_counts(images, [len(g) for g in groups], names, preprocessing)
