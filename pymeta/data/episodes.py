"""N-way K-shot episodes gathered from an :class:`ImageClasses` store, batched over tasks.

Episode ``i`` depends only on ``(seed, i)``: the same episodes come out in any order, with any
number of DataLoader workers, and a resumed run sees exactly the episodes it would have seen.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .._checks import check_bool, check_count
from .classes import ImageClasses


@dataclass
class Episode:
    """A meta-batch of ``T`` tasks; labels ``0..ways-1`` are assigned to classes at random.

    Regression tasks (:class:`pymeta.data.SinusoidTasks`) use the same container with float
    targets ``[T, K, *out]`` as labels, ``ways=None`` and each task's parameters in
    ``classes``.

    Attributes:
        support_x: float ``[T, ways * shots, C, H, W]``, class-major.
        support_y: int64 ``[T, ways * shots]``.
        query_x: float ``[T, ways * queries, C, H, W]``, class-major.
        query_y: int64 ``[T, ways * queries]``.
        ways: the number of classes per task (None for regression).
        classes: int64 ``[T, ways]``: the store's class index behind each label.

    Example:
        >>> from pymeta.data import EpisodeSampler, load_digits
        >>> ep = EpisodeSampler(load_digits("test"), ways=5, shots=1, queries=3, tasks=2)[0]
        >>> ep.tasks, ep.ways, tuple(ep.support_y.shape), tuple(ep.classes.shape)
        (2, 5, (2, 5), (2, 5))
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int | None
    classes: torch.Tensor

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Episode":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Episode(move(self.support_x), move(self.support_y), move(self.query_x),
                       move(self.query_y), self.ways, self.classes)

    def task_range(self, start: int, stop: int) -> "Episode":
        """Tasks ``start..stop-1`` of the meta-batch (views, not copies)."""
        return Episode(self.support_x[start:stop], self.support_y[start:stop],
                       self.query_x[start:stop], self.query_y[start:stop], self.ways,
                       self.classes[start:stop])


class EpisodeSampler(Dataset):
    """Seeded N-way K-shot Q-query episodes; ``sampler[i]`` is episode ``i``.

    Each item is an :class:`Episode` of ``tasks`` tasks. Images are gathered from the store's
    uint8 tensor in one indexing op and scaled to [0, 1]; nothing is decoded here.

    Args:
        classes: the class store to draw from.
        ways, shots, queries: N, K and Q.
        tasks: tasks per episode (the meta-batch).
        seed: episodes of different seeds are independent.
        length: ``len(sampler)``; defaults to 2**62 (an endless stream).
        augment: a random affine warp of every image (see :func:`random_affine`), drawn
            from the episode's own RNG, so augmented episodes stay reproducible.

    Example:
        >>> import torch
        >>> from pymeta.data import ImageClasses, EpisodeSampler
        >>> store = ImageClasses(torch.zeros(60, 1, 8, 8, dtype=torch.uint8),
        ...                      torch.arange(0, 61, 6), [f"c{i}" for i in range(10)])
        >>> ep = EpisodeSampler(store, ways=5, shots=1, queries=2, tasks=4, seed=0)[0]
        >>> tuple(ep.support_x.shape), tuple(ep.query_y.shape)
        ((4, 5, 1, 8, 8), (4, 10))
    """

    def __init__(self, classes: ImageClasses, ways: int, shots: int, queries: int,
                 tasks: int = 1, seed: int = 0, length: int | None = None,
                 dtype: torch.dtype = torch.float32, augment: bool = False):
        ways, shots, queries, tasks, seed = (
            check_count("EpisodeSampler", name, v, low=low)
            for name, v, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0),
                                 ("tasks", tasks, 1), ("seed", seed, 0)))
        self.classes, self.ways, self.shots, self.queries = classes, ways, shots, queries
        self.tasks, self.seed, self.dtype = tasks, seed, dtype
        self.augment = check_bool("EpisodeSampler", "augment", augment)
        self.length = (2 ** 62 if length is None
                       else check_count("EpisodeSampler", "length", length, low=0))
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (images are scaled "
                             f"to [0, 1]), got {dtype!r}")
        self._check_store()
        self._share = (0, tasks)
        self._counts = classes.counts
        self._max_count = int(self._counts.max())

    def _check_store(self) -> None:
        c = self.classes
        if self.ways > c.num_classes:
            raise ValueError(f"{self.ways}-way episodes need at least {self.ways} classes, "
                             f"but the dataset has {c.num_classes}")
        need = self.shots + self.queries
        short = (c.counts < need).nonzero().flatten()
        if short.numel():
            i = int(short[0])
            raise ValueError(f"{self.shots}-shot {self.queries}-query episodes need {need} "
                             f"images per class, but class {c.names[i]!r} has "
                             f"{int(c.counts[i])} ({short.numel()} of {c.num_classes} classes "
                             f"are short)")

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int, stream: int = 0) -> torch.Generator:
        """The RNG of episode ``index``, a pure function of ``(seed, index)``; ``stream`` 1
        is an independent one for the same episode (its augmentation)."""
        entropy = [self.seed, int(index)] + ([stream] if stream else [])
        state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes ``[T, N]``, image rows ``[T, N, K + Q]``) of episode ``index``."""
        index = check_count("EpisodeSampler", "episode index", index, low=0)
        if index >= self.length:
            raise IndexError(f"episode {index} out of range [0, {self.length})")
        g = self.generator(index)
        T, N, C = self.tasks, self.ways, self.classes.num_classes
        # Random keys + argsort draw N distinct classes per task without a Python loop.
        cls = torch.rand(T, C, generator=g).argsort(dim=1)[:, :N]
        keys = torch.rand(T, N, self._max_count, generator=g)
        keys[torch.arange(self._max_count) >= self._counts[cls].unsqueeze(-1)] = 2.0
        pos = keys.argsort(dim=-1)[..., : self.shots + self.queries]
        return cls, self.classes.offsets[cls].unsqueeze(-1) + pos

    def share(self, start: int, stop: int) -> "EpisodeSampler":
        """This sampler, assembling only tasks ``start..stop-1`` of each meta-batch: item
        ``i`` equals ``self[i].task_range(start, stop)``, without gathering (and warping) the
        other tasks' images. A data-parallel process trains on such a share."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop
                <= self.tasks):
            raise ValueError(f"EpisodeSampler.share: need 0 <= start < stop <= {self.tasks} "
                             f"(the meta-batch), got start={start!r}, stop={stop!r}")
        part = copy.copy(self)
        part._share = (start, stop)
        return part

    def __getitem__(self, index: int) -> Episode:
        cls, rows = self.rows(index)
        start, stop = self._share
        cls, rows = cls[start:stop], rows[start:stop]
        T, N, K, Q = stop - start, self.ways, self.shots, self.queries
        x = ImageClasses.to_float(self.classes.images[rows.flatten()], self.dtype)
        if self.augment:  # every task's draws, so that a share warps as the whole batch does
            per_task = N * (K + Q)
            u = _affine_draws(self.tasks * per_task, self.generator(index, stream=1))
            x = _warp(x, u[start * per_task:stop * per_task])
        x = x.view(T, N, K + Q, *x.shape[1:])
        labels = torch.arange(N).view(1, N, 1)
        return Episode(x[:, :, :K].reshape(T, N * K, *x.shape[3:]),
                       labels.expand(T, N, K).reshape(T, N * K),
                       x[:, :, K:].reshape(T, N * Q, *x.shape[3:]),
                       labels.expand(T, N, Q).reshape(T, N * Q), N, cls)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                  scale: tuple = (0.9, 1.1), shift: float = 0.1) -> torch.Tensor:
    """Warp each image of ``x [M, C, H, W]`` by its own random rotation (± ``degrees``),
    scale and shift (± ``shift`` of the image size); empty background stays 0.

    Small warps add intra-class variety, which matters when few classes are seen in
    training (the Omniglot preset trains on 109 of small1's 136 characters,
    before rotations).
    """
    return _warp(x, _affine_draws(x.shape[0], generator), degrees, scale, shift)


def _affine_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1


def _warp(x: torch.Tensor, u: torch.Tensor, degrees: float = 10.0, scale: tuple = (0.9, 1.1),
          shift: float = 0.1) -> torch.Tensor:
    """:func:`random_affine` with its uniform draws ``u [M, 4]`` (in [-1, 1)) given."""
    angle = u[:, 0] * math.radians(degrees)
    zoom = scale[0] + (u[:, 1] + 1) / 2 * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * shift], -1),
                         torch.stack([sin, cos, u[:, 3] * 2 * shift], -1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fixed_episodes(classes: ImageClasses, ways: int, shots: int, queries: int = 15,
                   n: int = 1000, seed: int = 2024) -> EpisodeSampler:
    """The seeded evaluation set: ``n`` one-task episodes, identical for every learner.

    Scores on it are paired comparisons: learner A and B see the same tasks.

    Example:
        >>> import torch
        >>> from pymeta.data import ImageClasses, fixed_episodes
        >>> store = ImageClasses(torch.zeros(40, 1, 8, 8, dtype=torch.uint8),
        ...                      torch.arange(0, 41, 20), ["a", "b"])
        >>> eps = fixed_episodes(store, ways=2, shots=1, queries=5, n=10)
        >>> len(eps), bool((eps[3].support_x == eps[3].support_x).all())
        (10, True)
    """
    return EpisodeSampler(classes, ways, shots, queries, tasks=1, seed=seed, length=n)


def episode_loader(sampler: EpisodeSampler, start: int = 0, stop: int | None = None,
                   num_workers: int = 0) -> DataLoader:
    """Episodes ``start..stop-1`` in order, optionally assembled in worker processes.

    Episodes are seeded by index. The loader draws its base seed from a generator of its
    own: iterating a DataLoader draws from the one it is given, and drawing from torch's
    global generator would shift every later random number (dropout, Siamese's pairs)
    between a fresh run and one resumed from a checkpoint."""
    stop = len(sampler) if stop is None else stop
    return DataLoader(sampler, batch_size=None, sampler=range(start, stop),
                      num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(0))
