"""Lake et al.'s Omniglot one-shot "runs": fixed 20-way, 1-shot classification trials.

Each ``runNN/`` folder holds ``training/classJJ.png`` (one drawing per class),
``test/itemKK.png`` (one more drawing of each class, shuffled) and ``class_labels.txt``
pairing them, one ``runNN/test/itemKK.png runNN/training/classJJ.png`` per line.
:func:`load_runs` reads that format (folder or zip); :func:`write_runs` generates it.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_count
from ._util import FileTree, open_image
from .omniglot import _index, preprocess_omniglot

_RUN_DIR = re.compile(r"run\d+")
LABELS_FILE = "class_labels.txt"


@dataclass
class OneShotRun:
    """One run: classify each query drawing as one of the support drawings' classes.

    Attributes:
        name: the run folder's name, e.g. ``"run01"``.
        support: uint8 ``[n_way, 1, H, W]``, ``training/class*.png`` in file-name order.
        query: uint8 ``[n_query, 1, H, W]``, ``test/item*.png`` in file-name order.
        answers: int64 ``[n_query]``; ``answers[i]`` indexes the support image of query i's class.

    Example:
        >>> import torch
        >>> from pymeta.data import OneShotRun
        >>> run = OneShotRun("run01", torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
        ...                  torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([1, 0]))
        >>> run.n_way, (torch.tensor([1, 0]) == run.answers).float().mean().item()
        (2, 1.0)
    """

    name: str
    support: torch.Tensor
    query: torch.Tensor
    answers: torch.Tensor

    @property
    def n_way(self) -> int:
        return self.support.shape[0]


def load_runs(path: str | os.PathLike, image_size: int = 28) -> list[OneShotRun]:
    """Read every ``runNN/`` under ``path`` (a folder or a zip), preprocessed like Omniglot.

    A malformed run (no ``class_labels.txt``, a bad line, a missing or undecodable image,
    an unlabelled test item) raises ValueError naming the file and line.

    Example:
        >>> from pymeta.data import load_runs
        >>> runs = load_runs("all_runs.zip")                     # doctest: +SKIP
        >>> len(runs), runs[0].support.shape, runs[0].answers[:3]  # doctest: +SKIP
        (20, torch.Size([20, 1, 28, 28]), tensor([11, 3, 7]))
    """
    image_size = check_count("load_runs", "image_size", image_size)
    with FileTree(path) as tree:
        prefixes = _run_prefixes(tree.files)
        if not prefixes:
            raise ValueError(f"no runNN/ folders found in {path}")
        names = Counter(p.rsplit("/", 1)[-1] for p in prefixes)
        twice = sorted(n for n, k in names.items() if k > 1)
        if twice:
            raise ValueError(f"{path}: run {twice[0]} appears in more than one folder")
        return [_load_run(tree, prefix, image_size) for prefix in prefixes]


def _run_prefixes(files: list[str]) -> list[str]:
    """Paths of the run folders, sorted by run name (``a/run02`` from ``a/run02/test/x.png``)."""
    found = set()
    for rel in files:
        parts = rel.split("/")
        for i, part in enumerate(parts[:-1]):
            if _RUN_DIR.fullmatch(part):
                found.add("/".join(parts[:i + 1]))
                break
    return sorted(found, key=lambda p: (p.rsplit("/", 1)[-1], p))


def _load_run(tree: FileTree, prefix: str, image_size: int) -> OneShotRun:
    def pngs(sub: str) -> list[str]:
        start = f"{prefix}/{sub}/"
        return sorted(f for f in tree.files if f.startswith(start) and f.lower().endswith(".png")
                      and "/" not in f[len(start):])

    support, query = pngs("training"), pngs("test")
    where = tree.where(f"{prefix}/{LABELS_FILE}")
    if not support or not query:
        raise ValueError(f"{tree.where(prefix)}: a run needs training/ and test/ images")
    labels = _parse_labels(tree, prefix, set(support), set(query))
    unlabelled = [q for q in query if q not in labels]
    if unlabelled:
        raise ValueError(f"{where}: no label for {', '.join(unlabelled)}")
    # one-shot runs pair every training image with exactly one test item
    answers = Counter(labels.values())
    for s_ in support:
        if answers[s_] != 1:
            raise ValueError(f"{where}: {tree.where(s_)} is the answer to {answers[s_]} "
                             "test items; a run pairs each training image with one")
    position = {s: i for i, s in enumerate(support)}
    return OneShotRun(prefix.rsplit("/", 1)[-1], _decode(tree, support, image_size),
                      _decode(tree, query, image_size),
                      torch.tensor([position[labels[q]] for q in query], dtype=torch.int64))


def _parse_labels(tree: FileTree, prefix: str, support: set, query: set) -> dict:
    """``{test item path: training image path}`` from the run's class_labels.txt."""
    rel = f"{prefix}/{LABELS_FILE}"
    where = tree.where(rel)
    if rel not in tree.files:
        raise ValueError(f"missing {where}")
    try:
        text = tree.read(rel).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not text: {e}") from e
    labels = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        test = _ref(prefix, fields[0], "test") if len(fields) == 2 else None
        train = _ref(prefix, fields[1], "training") if len(fields) == 2 else None
        if test is None or train is None:
            raise ValueError(f"{where} line {number}: expected '<run>/test/<item>.png "
                             f"<run>/training/<class>.png', got {line!r}")
        for ref, existing in ((test, query), (train, support)):
            if ref not in existing:
                raise ValueError(f"{where} line {number}: {tree.where(ref)} does not exist")
        if test in labels:
            raise ValueError(f"{where} line {number}: {fields[0]} is labelled twice")
        labels[test] = train
    return labels


def _ref(prefix: str, field: str, sub: str) -> str | None:
    """``prefix/sub/file.png`` from a label field ``runNN/sub/file.png``, or None if malformed
    (another run's file included)."""
    parts = field.replace("\\", "/").split("/")
    if len(parts) < 2 or parts[-2] != sub or not parts[-1].lower().endswith(".png"):
        return None
    if len(parts) >= 3 and _RUN_DIR.fullmatch(parts[-3]) and \
            parts[-3] != prefix.rsplit("/", 1)[-1]:
        return None
    return f"{prefix}/{sub}/{parts[-1]}"


def _decode(tree: FileTree, files: list[str], image_size: int) -> torch.Tensor:
    arrays = [preprocess_omniglot(open_image(tree.read(f), tree.where(f)), image_size)
              for f in files]
    if not arrays:
        return torch.zeros(0, 1, image_size, image_size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def write_runs(classes_source: str | os.PathLike, out_dir: str | os.PathLike, n_runs: int = 20,
               seed: int = 0, *, alphabets: list[str] | None = None,
               n_way: int = 20) -> list[dict]:
    """Generate ``n_runs`` within-alphabet one-shot runs from raw Omniglot drawings.

    ``classes_source`` is an Omniglot archive (zip or extracted folder, e.g.
    ``images_evaluation.zip``); ``alphabets`` restricts which alphabets runs may use. Each run
    picks an alphabet with at least ``n_way`` characters, ``n_way`` of its characters and two
    different drawings of each: one becomes ``training/classJJ.png``, the other a shuffled
    ``test/itemKK.png``. PNG bytes are copied unchanged. The runs are built in a temp folder
    and renamed to ``out_dir``, which must not exist or be empty. Returns, per run, the source
    paths used: ``{"name", "alphabet", "training": [...], "test": [...]}`` (test in item order).

    Example:
        >>> from pymeta.data import write_runs, load_runs
        >>> manifest = write_runs("images_evaluation.zip", "my_runs")  # doctest: +SKIP
        >>> len(load_runs("my_runs"))                                  # doctest: +SKIP
        20
    """
    n_runs = check_count("write_runs", "n_runs", n_runs)
    n_way = check_count("write_runs", "n_way", n_way, low=2)  # one class is no choice
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")
    with FileTree(classes_source) as tree:
        by_alphabet = _eligible_alphabets(_index(tree), alphabets, n_way)
        rng = np.random.default_rng(seed)
        plans = [_plan_run(rng, by_alphabet, n_way) for _ in range(n_runs)]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            manifest = [_write_run(tree, tmp, _run_name(i, n_runs), *plan)
                        for i, plan in enumerate(plans)]
            os.chmod(tmp, 0o755)
            if out_dir.exists():
                out_dir.rmdir()
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def _eligible_alphabets(index: dict, alphabets, n_way: int) -> dict:
    """``{alphabet: [[drawings of character] ...]}`` for alphabets usable in an n-way run."""
    by_alphabet: dict = {}
    for (alphabet, _), drawings in sorted(index.items()):
        if len(drawings) >= 2:
            by_alphabet.setdefault(alphabet, []).append(sorted(drawings))
    if alphabets is not None:
        wanted = [alphabets] if isinstance(alphabets, str) else list(alphabets)
        unknown = [a for a in wanted if a not in by_alphabet]
        if unknown:
            raise ValueError(f"unknown alphabet(s) {unknown}; available: {sorted(by_alphabet)}")
        by_alphabet = {a: by_alphabet[a] for a in sorted(set(wanted))}
    eligible = {a: chars for a, chars in by_alphabet.items() if len(chars) >= n_way}
    if not eligible:
        sizes = {a: len(chars) for a, chars in by_alphabet.items()}
        raise ValueError(f"no alphabet has {n_way} characters with 2+ drawings: {sizes}")
    return eligible


def _plan_run(rng: np.random.Generator, by_alphabet: dict, n_way: int) -> tuple:
    """(alphabet, [(training drawing, test drawing)] per class, class of each test item)."""
    names = sorted(by_alphabet)
    alphabet = names[int(rng.integers(len(names)))]
    chars = by_alphabet[alphabet]
    pairs = []
    for c in rng.choice(len(chars), size=n_way, replace=False):
        i, j = rng.choice(len(chars[c]), size=2, replace=False)
        pairs.append((chars[c][i], chars[c][j]))
    return alphabet, pairs, rng.permutation(n_way)


def _run_name(i: int, n_runs: int) -> str:
    return f"run{i + 1:0{max(2, len(str(n_runs)))}d}"


def _write_run(tree: FileTree, tmp: Path, name: str, alphabet: str, pairs: list,
               order: np.ndarray) -> dict:
    width = max(2, len(str(len(pairs))))
    (tmp / name / "training").mkdir(parents=True)
    (tmp / name / "test").mkdir()
    lines = []
    for k, c in enumerate(order):
        item, cls = f"item{k + 1:0{width}d}.png", f"class{c + 1:0{width}d}.png"
        lines.append(f"{name}/test/{item} {name}/training/{cls}")
        (tmp / name / "test" / item).write_bytes(tree.read(pairs[c][1]))
    for c, (train, _) in enumerate(pairs):
        (tmp / name / "training" / f"class{c + 1:0{width}d}.png").write_bytes(tree.read(train))
    (tmp / name / LABELS_FILE).write_text("\n".join(lines) + "\n")
    return {"name": name, "alphabet": alphabet, "training": [p[0] for p in pairs],
            "test": [pairs[c][1] for c in order]}
