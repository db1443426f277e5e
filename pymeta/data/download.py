"""Downloads and zip extraction that never leave a partial or unverified file behind.

A download streams into a temp file beside its destination, is checked against the
expected digest, and only then renamed into place; extraction does the same with a
temp directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from .._atomic import atomic_open

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A file could not be fetched; the message says where to place it by hand."""


def download_file(url: str, dest: str | os.PathLike, *, md5: str | None = None,
                  sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to the file ``dest``, verifying ``md5``/``sha256`` before it appears there.

    An existing ``dest`` that passes the checksums (or any existing ``dest`` when none are
    given) is kept without downloading. On a checksum mismatch nothing is left behind and a
    ValueError names the expected and actual digests; a network failure raises
    :class:`DownloadError` (an ``OSError``) naming the URL and the file to create by hand.

    Example:
        >>> from pymeta.data import download_file
        >>> download_file("https://example.com/a.zip", "/tmp/a.zip", md5="...")  # doctest: +SKIP
        PosixPath('/tmp/a.zip')
    """
    dest = Path(dest)
    if dest.is_dir():  # found before the download, not after it
        raise IsADirectoryError(f"cannot download {url} to {dest}: it is a directory; "
                                f"name the file to create")
    expected = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if dest.is_file() and (not expected or _digests(dest, expected) == expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashers = {k: hashlib.new(k) for k in expected}
    # atomic_open: any exception below (network, checksum) removes the temp file.
    with atomic_open(dest, "wb") as out:
        with _open_url(url, dest, timeout) as resp:
            total = _content_length(resp)
            received = 0
            with _progress_bar(progress, total, dest.name) as bar:
                while chunk := _read(resp, url, dest):
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise _failure(url, dest, f"connection closed after {received} of {total} bytes")
        actual = {k: h.hexdigest() for k, h in hashers.items()}
        if actual != expected:
            raise ValueError(f"checksum mismatch for {url}: expected {_fmt(expected)}, got "
                             f"{_fmt(actual)}; the download was discarded ({dest} not written)")
    return dest


def _open_url(url: str, dest: Path, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: malformed URL
        raise _failure(url, dest, str(e)) from e


def _read(resp, url: str, dest: Path) -> bytes:
    try:
        return resp.read(_CHUNK)
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
        raise _failure(url, dest, f"{type(e).__name__}: {e}") from e


def _content_length(resp) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _failure(url: str, dest: Path, reason: str) -> DownloadError:
    return DownloadError(f"could not download {url}: {reason}. If this machine is offline, "
                         f"fetch that URL elsewhere and place the file at {dest} "
                         f"(directory {dest.parent}).")


def _progress_bar(enabled: bool, total: int | None, name: str):
    if not enabled:
        return contextlib.nullcontext(_NoBar())
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                leave=False)


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _digests(path: Path, expected: dict) -> dict:
    hashers = {k: hashlib.new(k) for k in expected}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {k: h.hexdigest() for k, h in hashers.items()}


def _fmt(digests: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(digests.items()))


def extract_zip_atomic(zip_path: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Extract ``zip_path`` into ``dest_dir``, each top-level entry appearing whole or not at all.

    Members are extracted into a temp directory inside ``dest_dir`` and each top-level
    entry is then renamed into place (replacing an older one of the same name). Members
    with absolute paths or ``..`` components are rejected (ValueError) before anything is
    written. Returns the top-level paths created.

    Example:
        >>> from pymeta.data import extract_zip_atomic
        >>> extract_zip_atomic("images_background.zip", "/data/omniglot")  # doctest: +SKIP
        [PosixPath('/data/omniglot/images_background')]
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{zip_path} is not a readable zip archive: {e}") from e
    with zf:
        for name in zf.namelist():
            _check_member(name, zip_path)
        tops = sorted({PurePosixPath(n).parts[0] for n in zf.namelist() if PurePosixPath(n).parts})
        links = [dest_dir / t for t in tops if (dest_dir / t).is_symlink()]
        if links:  # replacing the link would not update what it points to
            raise ValueError(f"refusing to extract {zip_path}: {links[0]} is a symbolic link "
                             f"(to {os.readlink(links[0])}); extract into the folder it "
                             f"points to, or remove the link")
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{zip_path.name}.", suffix=".tmp", dir=dest_dir))
        try:
            try:
                zf.extractall(tmp)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(f"cannot extract {zip_path}: {e}") from e
            return [_swap_in(entry, dest_dir / entry.name) for entry in sorted(tmp.iterdir())]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_member(name: str, zip_path: Path) -> None:
    for p in (PurePosixPath(name), PureWindowsPath(name)):
        if p.is_absolute() or p.drive or p.root or ".." in p.parts:
            raise ValueError(f"refusing to extract {zip_path}: unsafe member path {name!r}")


def _swap_in(new: Path, target: Path) -> Path:
    """Rename ``new`` to ``target``; an existing directory there is moved aside first."""
    if target.is_dir() and not target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, target)
    return target
