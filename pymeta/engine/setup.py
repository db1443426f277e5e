"""From a :class:`RunConfig` to data splits, a learner and a finished run."""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._atomic import write_json
from ..data.classes import ImageClasses
from ..data.episodes import EpisodeSampler, fixed_episodes
from ..data.sinusoid import SinusoidTasks, fixed_sinusoid_tasks
from .checkpoint import load_checkpoint
from .config import RunConfig
from .distributed import barrier, from_process_0, local_rank, rank_and_world
from .evaluate import evaluate, metric_name
from .trainer import Trainer, check_same_classes

VAL_SEED, TEST_SEED = 1009, 2024  # fixed evaluation sets, shared by every learner
REGRESSION_DATA = ("sinusoid",)


def _or(value, default):
    """``value`` unless it is None (a 0 must reach the checks, not become the default)."""
    return default if value is None else value
_SEEDS = {"val": VAL_SEED, "test": TEST_SEED}


@dataclass
class Splits:
    """Disjoint meta-train / validation / test classes (digits: val and test share classes
    but not images), and the episode samplers drawn from them.

    Example:
        >>> from pymeta.engine.config import RunConfig
        >>> from pymeta.engine.setup import build_splits
        >>> cfg = RunConfig(data="digits")
        >>> splits = build_splits(cfg)
        >>> splits.input_shape, splits.eval_sampler(cfg, "test", episodes=3)[0].ways
        ((1, 28, 28), 5)
    """
    train: ImageClasses
    val: ImageClasses
    test: ImageClasses

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train.image_shape)

    @property
    def preprocessing(self) -> dict:
        """The training data's preprocessing record, the image shape the learner takes and a
        digest of each split's class names (a folder that gained a class splits anew)."""
        return {**self.train.preprocessing, "input_shape": list(self.input_shape),
                "split_classes": {split: _names_digest(getattr(self, split).names)
                                  for split in ("train", "val", "test")}}

    def summary(self) -> str:
        return (f"train {self.train.num_classes} classes, val {self.val.num_classes}, "
                f"test {self.test.num_classes}")

    def train_sampler(self, cfg: RunConfig) -> EpisodeSampler:
        with _naming_split("train"):
            return EpisodeSampler(self.train, cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch,
                                  seed=cfg.seed, augment=cfg.augment)

    def eval_sampler(self, cfg: RunConfig, split: str, episodes: int, ways: int | None = None,
                     shots: int | None = None, queries: int | None = None) -> EpisodeSampler:
        """The fixed episodes of ``split`` ("val" or "test"), the same for every learner."""
        with _naming_split(split):
            return fixed_episodes(getattr(self, split), _or(ways, cfg.test_ways),
                                  _or(shots, cfg.test_shots), _or(queries, cfg.eval_queries),
                                  n=episodes, seed=_SEEDS[split])


def _names_digest(names: list) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _naming_split(split: str):
    """Says which split an episode setting does not fit (train, val and test differ)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{split} split: {e}") from None


class SinusoidData:
    """Sinusoid regression (MAML's distribution): training, validation and test tasks are
    independent seeded streams of the same distribution; the same interface as
    :class:`Splits`.

    Example:
        >>> from pymeta.engine.config import RunConfig
        >>> cfg = RunConfig(data="sinusoid", shots=10, queries=10, meta_batch=25)
        >>> tuple(SinusoidData().train_sampler(cfg)[0].support_x.shape)
        (25, 10, 1)
    """

    input_shape = (1,)

    @property
    def preprocessing(self) -> dict:
        return SinusoidTasks(1, 1).description()

    def summary(self) -> str:
        d = self.preprocessing
        return (f"sine waves, amplitude U{d['amplitude']}, phase U{d['phase']}, "
                f"x U{d['x_range']}")

    def train_sampler(self, cfg: RunConfig) -> SinusoidTasks:
        return SinusoidTasks(cfg.shots, cfg.queries, cfg.meta_batch, seed=cfg.seed)

    def eval_sampler(self, cfg: RunConfig, split: str, episodes: int, ways: int | None = None,
                     shots: int | None = None, queries: int | None = None) -> SinusoidTasks:
        return fixed_sinusoid_tasks(episodes, _or(shots, cfg.test_shots),
                                    _or(queries, cfg.eval_queries), seed=_SEEDS[split])


def build_splits(cfg: RunConfig) -> Splits:
    """The dataset and protocol named by ``cfg.data`` and ``cfg.protocol``."""
    builders = {"digits": _digits, "omniglot": _omniglot, "folder": _folder,
                "sinusoid": lambda cfg: SinusoidData()}
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
    classes = load_image_folder(root, image_size=size)
    if classes.num_classes < 3:
        raise ValueError(f"{root} holds {classes.num_classes} class folder(s); a random "
                         f"train/val/test split needs at least 3 (or give train/val/test "
                         f"split files or folders)")
    rest, test = classes.split(cfg.val_fraction, cfg.split_seed)
    train, val = rest.split(cfg.val_fraction / (1 - cfg.val_fraction), cfg.split_seed + 1)
    return Splits(train, val, test)


def build_learner(cfg: RunConfig, input_shape: tuple, algo_kwargs: dict | None = None):
    """The learner named by ``cfg.algo`` on the backbone named by ``cfg.backbone``.

    Gradient-based learners classify with the backbone plus a linear head of
    ``cfg.max_ways`` outputs (``body``, ``head``) that starts every task at zero and is not
    meta-learned (``fixed_init=["head"]`` unless the options say otherwise); on regression
    data the backbone is the whole model and the loss is MSE.
    """
    from ..learners import build_learner as build
    from ..nn import build_backbone, evaluating
    gradient = cfg.algo in _gradient_algos()
    _check_learner_kind(cfg, gradient)
    torch.manual_seed(cfg.seed)
    model = _construct(f"backbone {cfg.backbone!r}", build_backbone, cfg.backbone,
                       **_backbone_kwargs(cfg, input_shape))
    if cfg.backbone == "mlp" and len(input_shape) > 1:  # images: the MLP sees flat pixels
        model = nn.Sequential(nn.Flatten(), *model)
    kwargs = dict(cfg.learner_kwargs if algo_kwargs is None else algo_kwargs)
    if cfg.data in REGRESSION_DATA:
        kwargs.setdefault("loss", "mse")
        return _construct(f"learner {cfg.algo!r}", build, cfg.algo, model, **kwargs)
    with torch.no_grad(), evaluating(model):
        try:
            feat = model(torch.zeros(2, *input_shape)).shape[1:]
        except RuntimeError as e:  # e.g. images too small for conv4's four poolings
            raise ValueError(f"backbone {cfg.backbone!r} cannot take inputs of shape "
                             f"{list(input_shape)} (see --image-size): "
                             f"{str(e).splitlines()[0]}") from None
    if gradient:
        model = _with_head(model, feat, cfg.max_ways)
        kwargs.setdefault("fixed_init", ["head"])
    return _construct(f"learner {cfg.algo!r}", build, cfg.algo, model,
                      **_feature_kwargs(cfg.algo, feat, kwargs))


def _gradient_algos() -> list[str]:
    from ..learners import LEARNERS, GradientLearner
    return sorted(a for a, c in LEARNERS.items() if issubclass(c, GradientLearner))


def _check_learner_kind(cfg: RunConfig, gradient: bool) -> None:
    if cfg.data in REGRESSION_DATA and not gradient:
        raise ValueError(f"{cfg.data} is a regression task: it needs a gradient-based learner "
                         f"({', '.join(_gradient_algos())}), not {cfg.algo!r}")
    if cfg.eval_steps and not gradient:
        raise ValueError(f"eval_steps (test-time inner steps) only apply to gradient-based "
                         f"learners, not {cfg.algo!r}")


def _backbone_kwargs(cfg: RunConfig, input_shape: tuple) -> dict:
    size = ({"in_features": math.prod(input_shape)} if cfg.backbone == "mlp"
            else {"in_channels": input_shape[0]})
    kwargs = {**size, **cfg.backbone_kwargs}
    if cfg.algo == "relation":
        kwargs.setdefault("flatten", False)  # the relation module compares feature maps
    return kwargs


def _with_head(backbone: nn.Module, feat: torch.Size, ways: int) -> nn.Sequential:
    """``backbone`` then a zero-initialised linear classifier. Every class's logit starts
    equal, which suits labels that are permuted per task, and the ``ways`` outputs serve any
    smaller number of ways (Kao et al. 2022's zeroing trick, with ``fixed_init``)."""
    head = nn.Linear(int(feat.numel()), ways)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    flatten = [("flatten", nn.Flatten())] if len(feat) > 1 else []
    return nn.Sequential(OrderedDict([("body", backbone), *flatten, ("head", head)]))


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


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train, keep the best validation checkpoint, then test it on the fixed test tasks.

    ``log`` gets the data summary, and without ``progress`` one line per validation.
    Writes ``results.json`` beside the checkpoints and returns its content. In a process
    group (``torchrun``) the processes share every meta-batch and the evaluation episodes;
    process 0 writes.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    data = build_splits_once_per_node(cfg)
    lead = rank_and_world()[0] == 0
    if lead:
        log(f"data: {cfg.data}: {data.summary()}")
    learner = build_learner(cfg, data.input_shape)
    val_eps = data.eval_sampler(cfg, "val", cfg.val_episodes)
    trainer = Trainer(learner, cfg, data.train_sampler(cfg), val_eps, out_dir,
                      data.preprocessing, progress, log)
    fit = trainer.fit(resume=resume)
    best = learner_from_checkpoint(from_process_0(lambda: _best_checkpoint(out_dir)),
                                   torch.device(cfg.device), out_dir / "best.pt")
    tests = [evaluate_split(best, cfg, data, ways, shots, steps, progress and lead,
                            shard=trainer.world > 1)
             for ways, shots in cfg.test_grid() for steps in cfg.eval_steps or [None]]
    results = {**fit, "metric": metric_name(best), "tests": tests,
               "tasks_seen": fit["steps"] * cfg.meta_batch, "config": cfg.to_dict(),
               "plot": str(out_dir / "curves.png")}
    if lead:
        write_json(out_dir / "results.json", results)
    return results


def _best_checkpoint(out_dir: Path) -> dict:
    if not (out_dir / "best.pt").exists():  # better() never takes a NaN score
        raise ValueError(f"every validation scored NaN, so there is no best checkpoint: the "
                         f"run diverged (try a lower --lr); {out_dir / 'last.pt'} holds its "
                         f"last state")
    return load_checkpoint(out_dir / "best.pt")


def build_splits_once_per_node(cfg: RunConfig) -> Splits:
    """:func:`build_splits`; in a process group, the first process of each node builds
    (downloads, decodes, caches) before the others, which then read its files."""
    if rank_and_world()[1] == 1:
        return build_splits(cfg)
    data = build_splits(cfg) if local_rank() == 0 else None
    barrier()
    return build_splits(cfg) if data is None else data


def evaluate_split(learner, cfg: RunConfig, data, ways: int | None = None,
                   shots: int | None = None, steps: int | None = None, progress: bool = False,
                   split: str = "test", episodes: int | None = None,
                   queries: int | None = None, shard: bool = False) -> dict:
    """Score ``learner`` on the fixed ``split`` tasks of ``data`` (from :func:`build_splits`);
    gradient-based learners adapt with ``steps`` inner steps (default: their ``test_steps``);
    ``shard`` as in :func:`pymeta.engine.evaluate.episode_scores`."""
    recorded = getattr(learner, "preprocessing", {})
    if recorded.get("dataset") == data.preprocessing.get("dataset"):  # else a cross-domain
        check_same_classes(recorded, data.preprocessing, [split],   # test: no shared class
                           f"cannot evaluate on the {split} split")
    sampler = data.eval_sampler(cfg, split, _or(episodes, cfg.test_episodes), ways, shots, queries)
    res = evaluate(learner, sampler, cfg.device, cfg.amp, progress=progress, steps=steps,
                   shard=shard)
    setting = {"ways": sampler.ways, "shots": sampler.shots, "queries": sampler.queries}
    if hasattr(learner, "test_steps"):
        setting["steps"] = _or(steps, learner.test_steps)
    return {**res, **setting}


_TRAINING_STATE = ("config", "preprocessing", "learner_config", "model")  # dicts pymeta.load reads


def _not_rebuildable(path, why: str) -> ValueError:
    return ValueError(f"{path} {why}: pymeta.load rebuilds the learners of pymeta.engine.train "
                      "(and the CLI) from their run config. For a Trainer built around your "
                      "own learner, load pymeta.engine.load_checkpoint(path)['model'] into it "
                      "with load_state_dict")


def load(path: str | Path, map_location="cpu"):
    """Restore a trained learner (in eval mode) from a pymeta checkpoint.

    The learner carries ``.config`` (the run's :class:`RunConfig`) and ``.preprocessing``,
    so data for evaluation can be made exactly as it was for training.

    Example:
        >>> import pymeta
        >>> learner = pymeta.load("runs/demo/best.pt")  # doctest: +SKIP
        >>> logits = learner(support_x, support_y, query_x, ways=5)  # doctest: +SKIP
    """
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device (a str or torch.device) that the whole "
                        f"learner moves to, got {type(map_location).__name__}")
    device = torch.device(map_location)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot load {path} onto {device}: torch sees no CUDA device")
    # to the CPU; the learner moves as a whole below
    return learner_from_checkpoint(load_checkpoint(path), device, path)


def learner_from_checkpoint(state: dict, device, path="the checkpoint"):
    """:func:`load` for a checkpoint already read (``path`` names it in errors)."""
    missing = [k for k in _TRAINING_STATE if k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint: it has no {missing}")
    malformed = [k for k in _TRAINING_STATE if not isinstance(state[k], dict)]
    if malformed or not isinstance(state["learner_config"].get("kwargs"), dict):
        raise ValueError(f"{path} is malformed: {malformed or ['learner_config']} must be "
                         f"dicts")
    cfg = RunConfig.from_dict(state["config"])
    pre = state["preprocessing"]
    shape = pre.get("input_shape", pre.get("image_shape"))  # older checkpoints: "image_shape"
    algo = state["learner_config"].get("algo")
    if shape is None:
        raise _not_rebuildable(path, "records no input shape")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d > 0 for d in shape):
        raise ValueError(f"{path} is malformed: its input shape is {shape!r}")
    if algo not in (None, cfg.algo):
        raise _not_rebuildable(path, f"holds a {algo!r} learner but its config says {cfg.algo!r}")
    learner = build_learner(cfg, tuple(shape), state["learner_config"]["kwargs"])
    try:
        learner.load_state_dict(state["model"])
    except RuntimeError as e:
        raise _not_rebuildable(path, "holds weights that do not fit the model its config "
                                     "describes") from e
    learner.to(device).eval()
    learner.config, learner.preprocessing = cfg, pre
    return learner

