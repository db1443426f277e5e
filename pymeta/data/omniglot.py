"""Omniglot (Lake et al., 2015) read straight from its zip archives or their extracted folders.

Images are thresholded to stroke maps and LANCZOS-resized (:func:`preprocess_omniglot`),
decoded once into an :class:`ImageClasses` and optionally cached as a ``.pt`` file under
``<root>/omniglot/cache/`` so later loads skip PNG decoding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ._util import (FileTree, cache_dir, cache_file, cache_load, cache_save, default_cache_dir,
                    open_image, parallel_map, stack_classes)
from .._checks import check_count
from .._warnings import warn_caller
from .classes import ImageClasses, concat
from .download import DownloadError, download_file
from .paths import data_root

CHECKSUMS = {
    "images_background": {"md5": "68d2efa1b9178cc56df9314c21c6e718"},
    "images_evaluation": {"md5": "6b91aef0f799c5bb55b94e3f2daec811"},
    "images_background_small1": {
        "sha256": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"},
    "images_background_small2": {
        "sha256": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"},
}
DEFAULT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
URL_ENV = "PYMETA_OMNIGLOT_URL"
SPLITS = ("background", "evaluation", "small1", "small2", "small2-only",
          "vinyals-train", "vinyals-test")
VINYALS_TRAIN_CLASSES = 1200   # of the 1623 characters; the remaining 423 are the test split
THRESHOLD = 128
DRAWINGS = 20  # per character, each by another person

# Archives each split reads; small2-only also lists small1 to know which alphabets to drop.
_SPLIT_ARCHIVES = {
    "background": ["images_background"], "evaluation": ["images_evaluation"],
    "small1": ["images_background_small1"], "small2": ["images_background_small2"],
    "small2-only": ["images_background_small2", "images_background_small1"],
    "vinyals-train": ["images_background", "images_evaluation"],
    "vinyals-test": ["images_background", "images_evaluation"],
}

ClassKey = tuple  # (archive, alphabet, character)


def preprocess_omniglot(pil_image, image_size: int = 28) -> np.ndarray:
    """Stroke map of an Omniglot drawing: uint8 ``[image_size, image_size]``, 255 = full stroke.

    Pixels darker than 128 are strokes (1), the rest background (0); that binary map is
    resized with PIL's LANCZOS filter, as the standard one-shot evaluation does.

    Example:
        >>> from PIL import Image
        >>> from pymeta.data import preprocess_omniglot
        >>> img = Image.new("L", (105, 105), 255)
        >>> img.paste(0, (0, 0, 105, 53))              # top half black ink
        >>> out = preprocess_omniglot(img, 28)
        >>> out.shape, out.dtype, int(out[0, 0]), int(out[-1, -1])
        ((28, 28), dtype('uint8'), 255, 0)
    """
    from PIL import Image

    gray = np.asarray(pil_image.convert("L"))
    strokes = Image.fromarray(np.where(gray < THRESHOLD, 255, 0).astype(np.uint8))
    if strokes.size != (image_size, image_size):
        strokes = strokes.resize((image_size, image_size), Image.LANCZOS)
    return np.array(strokes, dtype=np.uint8)


def omniglot_urls(split: str = "background", base_url: str | None = None) -> list[str]:
    """Download URLs of the archives a split needs (``base_url`` or ``$PYMETA_OMNIGLOT_URL``).

    Example:
        >>> from pymeta.data import omniglot_urls
        >>> omniglot_urls("small1", base_url="http://127.0.0.1:8000")
        ['http://127.0.0.1:8000/images_background_small1.zip']
    """
    base = (base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    return [f"{base}/{name}.zip" for name in _archives_of(split)]


def load_omniglot(split: str = "background", root: str | os.PathLike | None = None, *,
                  alphabets: Iterable[str] | str | None = None, image_size: int = 28,
                  download: bool = False, cache: bool | str | os.PathLike = True,
                  base_url: str | None = None) -> ImageClasses:
    """Omniglot characters as classes named ``"<Alphabet>/characterNN"``, 20 drawings each.

    Splits: ``"background"`` (964 characters, 30 alphabets) and ``"evaluation"`` (659, 20
    alphabets), Lake et al.'s split by alphabet; ``"small1"``/``"small2"``, the 5-alphabet
    subsets; ``"small2-only"``, the alphabets of small2 absent from small1; and
    ``"vinyals-train"``/``"vinyals-test"``: the characters of background + evaluation sorted
    by (alphabet, character), the first 1200 for training and the remaining 423 for test.
    That reproduces the sizes of Vinyals et al.'s split deterministically, not the exact
    class lists of published split files. ``alphabets`` restricts any split further.

    Archives are looked for as ``<root>/omniglot/<name>/`` (extracted), then
    ``<root>/omniglot/<name>.zip``, then the same directly under ``root``; ``root``
    defaults to :func:`data_root`. ``download=True`` fetches missing zips (checksum-
    verified) from ``base_url`` (default: ``$PYMETA_OMNIGLOT_URL`` or Lake's GitHub).
    ``cache`` is True (cache in ``cache/`` beside the archive, or in ``~/.cache/pymeta/omniglot``
    when that folder is read-only), False, or a directory.
    Use :meth:`ImageClasses.with_rotations` for the usual rotation augmentation.

    Example:
        >>> from pymeta.data import load_omniglot
        >>> train = load_omniglot("small1", alphabets=["Greek"])      # doctest: +SKIP
        >>> train.num_classes, train.image_shape, train.names[0]       # doctest: +SKIP
        (24, (1, 28, 28), 'Greek/character01')
        >>> train.with_rotations().num_classes                         # doctest: +SKIP
        96
    """
    image_size = check_count("load_omniglot", "image_size", image_size)
    archives = _archives_of(split)
    base = data_root(root)
    paths = _locate_or_download(archives, base, split, download, base_url)
    trees = {name: FileTree(path) for name, path in paths.items()}
    try:
        index = {name: _index(tree) for name, tree in trees.items()}
        keys = _filter_alphabets(_split_keys(split, index), alphabets, split)
        parts = [_decode_archive(trees[name], index[name], name,
                                 [k for k in keys if k[0] == name], image_size, cache)
                 for name in archives if any(k[0] == name for k in keys)]
    finally:
        for tree in trees.values():
            tree.close()
    combined = concat(parts) if parts else _empty(image_size)
    position = {n: i for i, n in enumerate(combined.names)}
    return combined.subset([position[_name(k)] for k in keys])


def _archives_of(split: str) -> list[str]:
    if split not in _SPLIT_ARCHIVES:
        raise ValueError(f"unknown Omniglot split {split!r}; choose one of {list(SPLITS)}")
    return _SPLIT_ARCHIVES[split]


def _candidates(name: str, base: Path) -> list[Path]:
    return [base / "omniglot" / name, base / "omniglot" / f"{name}.zip", base / name,
            base / f"{name}.zip"]


def _find(name: str, base: Path) -> Path | None:
    for path in _candidates(name, base):
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return path
    return None


def _locate_or_download(archives: Sequence[str], base: Path, split: str, download: bool,
                        base_url: str | None) -> dict:
    found = {name: _find(name, base) for name in archives}
    # With download=True a zip already there is verified too: a half-written one (an
    # interrupted wget) is fetched again instead of failing as "not a zip archive".
    missing = [name for name, path in found.items()
               if path is None or download and path.suffix == ".zip"]
    if not missing:
        return found
    urls = dict(zip(_archives_of(split), omniglot_urls(split, base_url)))
    target = base / "omniglot"
    if not download:
        searched = "\n  ".join(str(p) for name in missing for p in _candidates(name, base))
        raise FileNotFoundError(
            f"Omniglot split {split!r} needs {', '.join(missing)}; looked in:\n  {searched}\n"
            f"Download {', '.join(urls[n] for n in missing)} "
            f"into {target}/ (or pass download=True to the Python loaders)")
    for name in missing:
        dest = found[name] or target / f"{name}.zip"
        try:
            found[name] = download_file(urls[name], dest, **CHECKSUMS[name])
        except DownloadError as e:
            raise DownloadError(f"{e}\nOmniglot split {split!r} needs: "
                                f"{', '.join(urls[n] for n in missing)} -- place them in "
                                f"{target}/") from e
    return found


def _index(tree: FileTree) -> dict:
    """``{(alphabet, character): [drawing paths]}`` from ``.../<Alphabet>/<character>/*.png``."""
    index: dict = {}
    for rel in tree.files:
        parts = rel.split("/")
        if rel.lower().endswith(".png") and len(parts) >= 3:
            index.setdefault((parts[-3], parts[-2]), []).append(rel)
    if not index:
        raise ValueError(f"no Omniglot images (<Alphabet>/<character>/*.png) found in {tree.path}")
    for (alphabet, character), files in index.items():
        if len(files) > DRAWINGS:  # a missing level, or two copies of the tree
            raise ValueError(f"{tree.path}: {len(files)} drawings of {alphabet}/{character}, "
                             f"but Omniglot has {DRAWINGS} per character: the files must be "
                             f"<Alphabet>/<character>/*.png, in one copy")
    short = sorted((len(files), f"{a}/{c}") for (a, c), files in index.items()
                   if len(files) < DRAWINGS)
    if short:  # a zip's CRCs catch damage, but not files missing from an extracted copy
        warn_caller(f"{tree.path}: {len(short)} character(s) have fewer than {DRAWINGS} "
                    f"drawings (e.g. {short[0][1]}: {short[0][0]}); the copy looks "
                    f"incomplete, so classes and fixed episodes differ from Omniglot's")
    return index


def _split_keys(split: str, index: dict) -> list:
    """Sorted ``(archive, alphabet, character)`` keys of the split's classes."""
    def keys_of(name):
        return sorted((name, a, c) for a, c in index[name])

    if split in ("vinyals-train", "vinyals-test"):
        every = sorted(keys_of("images_background") + keys_of("images_evaluation"),
                       key=lambda k: (k[1], k[2]))
        cut = VINYALS_TRAIN_CLASSES
        return every[:cut] if split == "vinyals-train" else every[cut:]
    if split == "small2-only":
        dropped = {a for a, _ in index["images_background_small1"]}
        return [k for k in keys_of("images_background_small2") if k[1] not in dropped]
    return keys_of(_SPLIT_ARCHIVES[split][0])


def _filter_alphabets(keys: list, alphabets, split: str) -> list:
    if alphabets is None:
        return keys
    wanted = [alphabets] if isinstance(alphabets, str) else list(alphabets)
    available = sorted({k[1] for k in keys})
    unknown = [a for a in wanted if a not in available]
    if not wanted:
        raise ValueError(f"alphabets is empty: name at least one of {available} (None: all)")
    if unknown:
        raise ValueError(f"unknown Omniglot alphabet(s) {unknown} for split {split!r}; "
                         f"available: {available}")
    return [k for k in keys if k[1] in set(wanted)]


def _name(key: ClassKey) -> str:
    return f"{key[1]}/{key[2]}"


def _preprocessing(image_size: int) -> dict:
    return {"dataset": "omniglot", "image_size": image_size, "threshold": THRESHOLD,
            "stroke": 1, "resample": "lanczos"}


def _decode_archive(tree: FileTree, index: dict, name: str, keys: list, image_size: int,
                    cache) -> ImageClasses:
    """The classes ``keys`` of one archive; with a cache, the whole archive is decoded once."""
    directory = cache_dir(cache, default_cache_dir(tree.path.parent / "cache", "omniglot"))
    if directory is None:
        return _decode(tree, index, keys, image_size)
    key = {"archive": name, "image_size": image_size, "threshold": THRESHOLD,
           "source": tree.fingerprint()}
    path = cache_file(directory, f"{name}-{image_size}px", key, str(tree.path.resolve()))
    full = cache_load(path, key)
    if full is None:
        full = _decode(tree, index, sorted((name, a, c) for a, c in index), image_size)
        cache_save(path, key, full)
    position = {n: i for i, n in enumerate(full.names)}
    return full.subset([position[_name(k)] for k in keys])


def _decode(tree: FileTree, index: dict, keys: list, image_size: int) -> ImageClasses:
    """The classes ``keys`` of ``tree``, whose :func:`_index` is ``index``."""
    groups = [index[(a, c)] for _, a, c in keys]
    blobs = [(tree.read(rel), tree.where(rel)) for g in groups for rel in g]
    arrays = iter(parallel_map(lambda b: preprocess_omniglot(open_image(*b), image_size), blobs))
    per_class = [[next(arrays) for _ in g] for g in groups]
    return stack_classes(per_class, [_name(k) for k in keys], _preprocessing(image_size),
                         (1, image_size, image_size))


def _empty(image_size: int) -> ImageClasses:
    return stack_classes([], [], _preprocessing(image_size), (1, image_size, image_size))
