"""Few-shot datasets stored as image files: one folder per class, or Ravi & Larochelle CSV splits.

Covers miniImageNet-style layouts: ``root/<class>/*.jpg``, ``root/<split>/<class>/*.jpg``,
or ``root/<split>.csv`` (``filename,label``) with the files in ``root/images/`` or
``root/<label>/``. Images are decoded once to RGB uint8 ``[3, S, S]``.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from ._util import (cache_dir, cache_file, cache_load, cache_save, default_cache_dir, open_image,
                    parallel_map, stack_classes)
from .._checks import check_count
from .._warnings import warn_caller
from .classes import ImageClasses
from .paths import data_root

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class FewShotImageFolder:
    """A folder of class-labelled images decoded into :attr:`classes` (an :class:`ImageClasses`).

    Args:
        root: dataset folder.
        split_csv: a Ravi & Larochelle split file (header ``filename,label``); files are
            looked up as ``root/images/<filename>``, then ``root/<label>/<filename>``.
        image_size: images are resized (PIL LANCZOS) to ``image_size x image_size`` RGB.
        split: a split name: uses ``root/<split>.csv`` (or ``root/splits/<split>.csv``) if
            present, else the class folders of ``root/<split>/``.
        cache: False (default), True (``<data_root()>/cache/image_folder/``) or a directory
            for a ``.pt`` cache of the decoded images, invalidated when any file changes.

    Classes are sorted by name; images within a class by file name (CSV: by row order).
    A missing or empty ``root`` raises FileNotFoundError; an undecodable image ValueError.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from pymeta.data import FewShotImageFolder
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for cls in ("cat", "dog"):
        ...     (root / cls).mkdir()
        ...     for i in range(3):
        ...         Image.new("RGB", (40, 30), (i, 0, 0)).save(root / cls / f"{i}.png")
        >>> ds = FewShotImageFolder(root, image_size=16)
        >>> ds.classes.names, ds.classes.image_shape, ds.classes.counts.tolist()
        (['cat', 'dog'], (3, 16, 16), [3, 3])
    """

    def __init__(self, root: str | os.PathLike, split_csv: str | os.PathLike | None = None, *,
                 image_size: int = 84, split: str | None = None,
                 cache: bool | str | os.PathLike = False):
        image_size = check_count("FewShotImageFolder", "image_size", image_size)
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.folder, self.split_csv = _resolve(self.root, split_csv, split)
        listing = (_csv_listing(self.folder, self.split_csv) if self.split_csv
                   else _folder_listing(self.folder))
        #: class name -> image paths, in the order stored in :attr:`classes`
        self.files: dict = listing
        self.classes: ImageClasses = self._load(cache, split)

    def _load(self, cache, split) -> ImageClasses:
        directory = cache_dir(cache, default_cache_dir(data_root() / "cache" / "image_folder",
                                                       "image_folder"))
        if directory is None:
            return _decode(self.files, self.image_size)
        key = {"folder": str(self.folder.resolve()), "image_size": self.image_size,
               "csv": str(self.split_csv.resolve()) if self.split_csv else "",
               "source": _fingerprint(self.files, self.split_csv)}
        # split folders of two datasets are both "train", split files of one folder share it
        path = cache_file(directory, f"{self.folder.name}-{split or 'all'}-{self.image_size}px",
                          key, f"{key['folder']}\0{key['csv']}")
        classes = cache_load(path, key)
        if classes is None:
            classes = _decode(self.files, self.image_size)
            cache_save(path, key, classes)
        return classes

    def __repr__(self) -> str:
        return (f"FewShotImageFolder({str(self.folder)!r}, classes={self.classes.num_classes}, "
                f"images={len(self.classes)}, image_size={self.image_size})")


def load_image_folder(root: str | os.PathLike, split_csv: str | os.PathLike | None = None, *,
                      image_size: int = 84, split: str | None = None,
                      cache: bool | str | os.PathLike = False) -> ImageClasses:
    """``FewShotImageFolder(...).classes``: the decoded classes of an image folder.

    Example:
        >>> from pymeta.data import load_image_folder
        >>> train = load_image_folder("miniImageNet", split="train")   # doctest: +SKIP
        >>> train.num_classes, train.image_shape                        # doctest: +SKIP
        (64, (3, 84, 84))
    """
    return FewShotImageFolder(root, split_csv, image_size=image_size, split=split,
                              cache=cache).classes


def _resolve(root: Path, split_csv, split: str | None) -> tuple[Path, Path | None]:
    """(folder holding the images, CSV file or None)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if split_csv is not None:
        path = Path(split_csv).expanduser()
        if not path.is_file() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"split file {split_csv} not found (also tried {root / path})")
        return root, path
    if split is None:
        return root, None
    for path in (root / f"{split}.csv", root / "splits" / f"{split}.csv"):
        if path.is_file():
            return root, path
    if (root / split).is_dir():
        return root / split, None
    raise FileNotFoundError(f"split {split!r} not found: no {root / f'{split}.csv'}, "
                            f"{root / 'splits' / f'{split}.csv'} or folder {root / split}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _folder_listing(folder: Path) -> dict:
    listing, seen, empty, broken = {}, {}, [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        named = [f for f in d.iterdir() if _is_image(f.name)]
        files = sorted(f for f in named if f.is_file())
        broken += [f for f in named if f.is_symlink() and not f.exists()]
        for f in files:  # a symlinked copy could be support and query of one episode
            first = seen.setdefault(f.resolve(), f)
            if first != f:
                raise ValueError(f"{f} is the same image as {first}")
        if files:
            listing[d.name] = files
        else:
            empty.append(d.name)
    if not listing:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
                                f"under {folder}")
    if broken:  # images the folder names but cannot give: said, not dropped quietly
        warn_caller(f"{folder}: skipped {len(broken)} broken symbolic link(s), e.g. {broken[0]}")
    if empty:  # the class count differs from the folder count: say so
        warn_caller(f"{folder}: skipped {len(empty)} folder(s) with no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:5])}")
    return listing


def _csv_listing(folder: Path, csv_path: Path) -> dict:
    by_label: dict = {}
    seen: dict = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{csv_path}:1: expected the header 'filename,label'")
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{csv_path}:{line}: expected 'filename,label', got {row}")
        name, label = row[0].strip(), row[1].strip()
        candidates = (folder / "images" / name, folder / label / name)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{csv_path}:{line}: image {name} not found as "
                                    f"{candidates[0]} or {candidates[1]}")
        real = path.resolve()  # "../images/a.png" or a symlink is the same image again
        if real in seen:  # it could be support and query of one episode
            raise ValueError(f"{csv_path}:{line}: image {name} is listed again (first on line "
                             f"{seen[real]})")
        seen[real] = line
        by_label.setdefault(label, []).append(path)
    if not by_label:
        raise ValueError(f"{csv_path} lists no images")
    return {label: by_label[label] for label in sorted(by_label)}


def _decode_one(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    img = open_image(path.read_bytes(), str(path)).convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode(listing: dict, image_size: int) -> ImageClasses:
    paths = [p for files in listing.values() for p in files]
    arrays = iter(parallel_map(lambda p: _decode_one(p, image_size), paths, min_parallel=64))
    groups = [[next(arrays) for _ in files] for files in listing.values()]
    preprocessing = {"dataset": "image_folder", "image_size": image_size, "mode": "RGB",
                     "resample": "lanczos"}
    return stack_classes(groups, list(listing), preprocessing, (3, image_size, image_size))


def _fingerprint(listing: dict, csv_path: Path | None) -> str:
    entries = [(label, p) for label, files in listing.items() for p in files]
    entries += [("<split file>", csv_path)] if csv_path else []
    h = hashlib.sha256()
    for label, p in entries:
        st = p.stat()
        h.update(f"{label}|{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
