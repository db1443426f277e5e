"""From a :class:`RunConfig` to data splits, a learner and a finished run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .._atomic import atomic_open
from ..data.classes import ImageClasses
from ..data.episodes import EpisodeSampler, fixed_episodes
from .checkpoint import load_checkpoint
from .config import RunConfig
from .evaluate import evaluate
from .trainer import Trainer

VAL_SEED, TEST_SEED = 1009, 2024  # fixed evaluation sets, shared by every learner


@dataclass
class Splits:
    """Disjoint meta-train / validation / test classes (digits: val and test share classes
    but not images)."""
    train: ImageClasses
    val: ImageClasses
    test: ImageClasses

    @property
    def preprocessing(self) -> dict:
        """The training data's preprocessing record plus the image shape the learner takes."""
        return {**self.train.preprocessing, "image_shape": list(self.train.image_shape)}


def build_splits(cfg: RunConfig) -> Splits:
    """The dataset and protocol named by ``cfg.data`` and ``cfg.protocol``."""
    builders = {"digits": _digits, "omniglot": _omniglot, "folder": _folder}
    if cfg.data not in builders:
        raise ValueError(f"unknown data {cfg.data!r}; choose from {sorted(builders)}")
    return builders[cfg.data](cfg)


def _digits(cfg: RunConfig) -> Splits:
    from ..data.digits import load_digits
    size = cfg.image_size or 28
    val, test = load_digits("test", image_size=size).split_examples(0.5, cfg.split_seed)
    return Splits(load_digits("train", image_size=size), val, test)


def _omniglot(cfg: RunConfig) -> Splits:
    from ..data.omniglot import load_omniglot
    size = cfg.image_size or 28
    load = lambda split: load_omniglot(split, cfg.root, image_size=size)  # noqa: E731
    protocols = {"small": ("small1", "small2-only"), "lake": ("background", "evaluation"),
                 "vinyals": ("vinyals-train", "vinyals-test")}
    if cfg.protocol not in protocols:
        raise ValueError(f"unknown omniglot protocol {cfg.protocol!r}; choose from "
                         f"{sorted(protocols)}")
    train_split, test_split = protocols[cfg.protocol]
    # Validation holds out a fraction of the training characters, never rotated; small2 is
    # never used for validation (its Greek and Latin are small1's very images).
    train, val = load(train_split).split(cfg.val_fraction, cfg.split_seed)
    if cfg.rotations:
        train = train.with_rotations()
    return Splits(train, val, load(test_split))


def _folder(cfg: RunConfig) -> Splits:
    """Ravi & Larochelle splits (``train/val/test.csv`` or split folders) when the root has
    them, else its classes split at random into train / val_fraction / val_fraction."""
    from ..data.image_folder import load_image_folder
    if not cfg.root:
        raise ValueError("--data folder needs --root DIR")
    root, size = Path(cfg.root).expanduser(), cfg.image_size or 84
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = ("train", "val", "test")
    if all(any(p.exists() for p in (root / f"{n}.csv", root / "splits" / f"{n}.csv", root / n))
           for n in names):
        return Splits(*(load_image_folder(root, split=n, image_size=size) for n in names))
    rest, test = load_image_folder(root, image_size=size).split(cfg.val_fraction, cfg.split_seed)
    train, val = rest.split(cfg.val_fraction / (1 - cfg.val_fraction), cfg.split_seed + 1)
    return Splits(train, val, test)


def build_learner(cfg: RunConfig, image_shape: tuple, algo_kwargs: dict | None = None):
    """The learner named by ``cfg.algo`` on the backbone named by ``cfg.backbone``."""
    from ..learners import build_learner as build
    from ..nn import build_backbone
    bkw = {"in_channels": image_shape[0], **cfg.backbone_kwargs}
    if cfg.algo == "relation":
        bkw.setdefault("flatten", False)  # the relation module compares feature maps
    torch.manual_seed(cfg.seed)
    backbone = _construct(f"backbone {cfg.backbone!r}", build_backbone, cfg.backbone, **bkw)
    kwargs = dict(cfg.learner_kwargs if algo_kwargs is None else algo_kwargs)
    with torch.no_grad():
        feat = backbone.eval()(torch.zeros(2, *image_shape)).shape[1:]
    backbone.train()
    return _construct(f"learner {cfg.algo!r}", build, cfg.algo, backbone,
                      **_feature_kwargs(cfg.algo, feat, kwargs))


def _construct(what: str, factory, *args, **kwargs):
    try:
        return factory(*args, **kwargs)
    except TypeError as e:  # an unknown or mistyped option from the command line
        raise ValueError(f"invalid options for {what}: {e}") from None


def _feature_kwargs(algo: str, feat: torch.Size, kwargs: dict) -> dict:
    # Heads sized by the embedding: filled in from a dry run unless the user gave them.
    if algo in ("matching", "siamese"):
        kwargs.setdefault("feature_dim", int(torch.Size(feat).numel()))
    elif algo == "relation":
        kwargs.setdefault("feature_channels", int(feat[0]))
    return kwargs


def eval_sampler(cfg: RunConfig, classes: ImageClasses, episodes: int, seed: int,
                 ways: int | None = None, shots: int | None = None,
                 queries: int | None = None) -> EpisodeSampler:
    return fixed_episodes(classes, ways or cfg.test_ways, shots or cfg.test_shots,
                          queries or cfg.eval_queries, n=episodes, seed=seed)


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train, keep the best validation checkpoint, then test it on the fixed test episodes.

    Writes ``results.json`` beside the checkpoints and returns its content.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    splits = build_splits(cfg)
    log(f"data: {cfg.data} train {splits.train.num_classes} classes, val "
        f"{splits.val.num_classes}, test {splits.test.num_classes}")
    learner = build_learner(cfg, splits.train.image_shape)
    train_eps = EpisodeSampler(splits.train, cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch,
                               seed=cfg.seed, augment=cfg.augment)
    val_eps = eval_sampler(cfg, splits.val, cfg.val_episodes, VAL_SEED)
    trainer = Trainer(learner, cfg, train_eps, val_eps, out_dir, splits.preprocessing, progress)
    fit = trainer.fit(resume=resume)
    best = load(out_dir / "best.pt", cfg.device)
    tests = []
    for ways, shots in cfg.test_grid():
        sampler = eval_sampler(cfg, splits.test, cfg.test_episodes, TEST_SEED, ways, shots)
        res = evaluate(best, sampler, cfg.device, cfg.amp, progress=progress)
        tests.append({**res, "ways": ways, "shots": shots, "queries": cfg.eval_queries})
    results = {**fit, "tests": tests, "tasks_seen": fit["steps"] * cfg.meta_batch,
               "config": cfg.to_dict(), "plot": str(out_dir / "curves.png")}
    with atomic_open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


def load(path: str | Path, map_location="cpu"):
    """Restore a trained learner (in eval mode) from a pymeta checkpoint.

    The learner carries ``.config`` (the run's :class:`RunConfig`) and ``.preprocessing``,
    so data for evaluation can be made exactly as it was for training.

    Example:
        >>> import pymeta
        >>> learner = pymeta.load("runs/demo/best.pt")  # doctest: +SKIP
        >>> logits = learner(support_x, support_y, query_x, ways=5)  # doctest: +SKIP
    """
    state = load_checkpoint(path, map_location)
    cfg = RunConfig.from_dict(state["config"])
    pre = state["preprocessing"]
    learner = build_learner(cfg, tuple(pre["image_shape"]), state["learner_config"]["kwargs"])
    learner.load_state_dict(state["model"])
    learner.to(map_location).eval()
    learner.config, learner.preprocessing = cfg, pre
    return learner

