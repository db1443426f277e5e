"""The full configuration of a training run, stored in every checkpoint."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch


@dataclass
class RunConfig:
    """Everything that defines a run: rebuilding from it reproduces the run.

    Example:
        >>> from pymeta.engine import RunConfig
        >>> cfg = RunConfig(algo="protonet", data="digits", ways=5, shots=1, steps=100)
        >>> RunConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    algo: str = "protonet"
    backbone: str = "conv4"
    backbone_kwargs: dict = field(default_factory=dict)
    learner_kwargs: dict = field(default_factory=dict)
    # data
    data: str = "digits"            # digits | omniglot | folder | sinusoid
    root: str | None = None
    protocol: str = "small"         # omniglot: small | lake | vinyals
    image_size: int | None = None   # None: the dataset's default
    rotations: bool = True          # omniglot training classes rotated by 90/180/270
    augment: bool = False           # random affine warp of every training image
    val_fraction: float = 0.2
    split_seed: int = 0
    # episodes
    ways: int = 5
    shots: int = 5
    queries: int = 15
    meta_batch: int = 1
    eval_ways: int | None = None
    eval_shots: int | None = None
    eval_queries: int = 15
    test_settings: list = field(default_factory=list)  # more [ways, shots] to test at the end
    eval_steps: list = field(default_factory=list)  # gradient learners: test inner steps
    # optimisation
    steps: int = 1000
    optimizer: str = "adam"         # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None  # the meta-gradient's global norm is clipped to this
    schedule: str = "step"          # step | cosine | none
    lr_step: int = 2000
    lr_gamma: float = 0.5
    # bookkeeping
    val_every: int = 250
    val_episodes: int = 200
    test_episodes: int = 1000
    checkpoint_every: int = 0       # 0: checkpoint at validations only
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None          # bf16 | fp16
    workers: int = 0

    @property
    def test_ways(self) -> int:
        return self.eval_ways or self.ways

    @property
    def test_shots(self) -> int:
        return self.eval_shots or self.shots

    def test_grid(self) -> list:
        """The distinct (ways, shots) settings the final test reports, the eval one first."""
        grid = [(self.test_ways, self.test_shots)]
        grid += [tuple(s) for s in self.test_settings if tuple(s) not in grid]
        return grid

    @property
    def max_ways(self) -> int:
        """The most classes any task of the run has (a gradient learner's head size)."""
        return max([self.ways] + [w for w, _ in self.test_grid()])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run config keys: {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> "RunConfig":
        self._check_types()
        for name in ("ways", "shots", "meta_batch", "steps", "val_every", "val_episodes",
                     "test_episodes", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queries < 1 or self.eval_queries < 1:
            raise ValueError("queries must be >= 1")
        for name in ("eval_ways", "eval_shots", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule == "step" and self.lr_step < 1:
            raise ValueError(f"lr_step must be >= 1, got {self.lr_step}")
        for name in ("lr", "lr_gamma"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got "
                                 f"{getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be a positive finite number or None, got "
                             f"{self.grad_clip}")
        if self.checkpoint_every < 0 or self.workers < 0:
            raise ValueError("checkpoint_every and workers must be >= 0, got "
                             f"{self.checkpoint_every} and {self.workers}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine", "none"):
            raise ValueError(f"schedule must be step, cosine or none, got {self.schedule!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got "
                             f"{self.device!r}") from None
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16 or fp16, got {self.amp!r}")
        if any(not _is(s, "int") or s < 0 for s in self.eval_steps):
            raise ValueError(f"eval_steps must be ints >= 0, got {self.eval_steps}")
        for name in ("seed", "split_seed"):  # torch's generators take 64-bit seeds
            if not 0 <= getattr(self, name) < 2 ** 63:
                raise ValueError(f"{name} must be in [0, 2**63), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if any(not isinstance(s, (list, tuple)) or len(s) != 2 or not all(
                _is(v, "int") and v >= 1 for v in s) for s in self.test_settings):
            raise ValueError(f"test_settings must be [ways, shots] pairs of ints >= 1, got "
                             f"{self.test_settings}")
        return self

    def _check_types(self) -> None:
        """Each field holds its annotated type: "5", 2.5 or True as a count, or "False" as
        a flag, would otherwise fail deep inside the run or, worse, silently mean something
        else."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, _, optional = f.type.partition(" | ")
            if not (value is None and optional or _is(value, kind)):
                raise ValueError(f"{f.name} must be {_TYPES[kind][1]}"
                                 f"{' or None' if optional else ''}, got {value!r}")


_TYPES = {"int": (int, "an int"), "float": ((int, float), "a number"),
          "bool": (bool, "True or False"), "str": (str, "a string"), "dict": (dict, "a dict"),
          "list": ((list, tuple), "a list")}


def _is(value, kind: str) -> bool:
    """isinstance by annotation name; a bool is no number here."""
    return isinstance(value, _TYPES[kind][0]) and not (
        isinstance(value, bool) and kind in ("int", "float"))
