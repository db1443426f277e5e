"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): the classic MAML benchmark."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_count
from .episodes import Episode


class SinusoidTasks(Dataset):
    """Seeded sine-wave regression tasks; ``tasks[i]`` is a meta-batch of ``tasks`` tasks.

    Task ``t`` is ``y = A sin(x - phase)`` with ``A ~ U[amplitude]``, ``phase ~ U[phase]``;
    its ``shots`` support and ``queries`` query inputs are drawn from ``U[x_range]``.
    Item ``i`` depends only on ``(seed, i)``, as for :class:`pymeta.data.EpisodeSampler`.
    The defaults are MAML's distribution: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].

    Each item is an :class:`Episode` with inputs and targets ``[T, K, 1]``, ``ways=None`` and
    the tasks' (amplitude, phase) in ``classes`` (float64 ``[T, 2]``).

    Example:
        >>> from pymeta.data import SinusoidTasks
        >>> ep = SinusoidTasks(shots=10, queries=10, tasks=25, seed=0)[0]
        >>> tuple(ep.support_x.shape), tuple(ep.query_y.shape)
        ((25, 10, 1), (25, 10, 1))
        >>> a, phase = ep.classes[0]
        >>> bool(torch.allclose(ep.support_y[0], a * torch.sin(ep.support_x[0] - phase)))
        True
    """

    def __init__(self, shots: int, queries: int, tasks: int = 1, seed: int = 0,
                 length: int | None = None, amplitude: tuple = (0.1, 5.0),
                 phase: tuple = (0.0, math.pi), x_range: tuple = (-5.0, 5.0)):
        for name, value in (("shots", shots), ("queries", queries), ("tasks", tasks)):
            check_count("SinusoidTasks", name, value)
        for name, bounds in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not _finite_range(bounds):
                raise ValueError(f"SinusoidTasks: {name} must be finite (low, high) with "
                                 f"low <= high, got {bounds!r}")
        self.shots, self.queries, self.tasks = shots, queries, tasks
        self.seed = check_count("SinusoidTasks", "seed", seed, low=0)
        self.ways = None
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.length = (2 ** 62 if length is None
                       else check_count("SinusoidTasks", "length", length, low=0))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episode:
        index = check_count("SinusoidTasks", "task batch index", index, low=0)
        if index >= self.length:
            raise IndexError(f"task batch {index} out of range [0, {self.length})")
        seeds = np.random.SeedSequence([self.seed, int(index)]).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(int(seeds[0]) << 32 | int(seeds[1]))
        T, K, Q = self.tasks, self.shots, self.queries
        params = torch.stack([_uniform(T, self.amplitude, g), _uniform(T, self.phase, g)], 1)
        x = _uniform((T, K + Q, 1), self.x_range, g)
        y = params[:, :1, None] * torch.sin(x - params[:, 1:, None])
        x, y = x.float(), y.float()
        return Episode(x[:, :K], y[:, :K], x[:, K:], y[:, K:], None, params)

    def description(self) -> dict:
        """What defines the task distribution (recorded in checkpoints)."""
        return {"dataset": "sinusoid", "amplitude": list(self.amplitude),
                "phase": list(self.phase), "x_range": list(self.x_range),
                "input_shape": [1]}


def _uniform(shape, bounds: tuple, g: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def fixed_sinusoid_tasks(n: int = 1000, shots: int = 5, queries: int = 100,
                         seed: int = 2024) -> SinusoidTasks:
    """The seeded evaluation set: one item of ``n`` tasks (MAML's test protocol: K=5 support
    points and 100 query points per task), identical for every learner."""
    return SinusoidTasks(shots, queries, tasks=n, seed=seed, length=1)


def _finite_range(bounds) -> bool:
    """Whether ``bounds`` is a (low, high) pair of finite real numbers with low <= high."""
    try:
        lo, hi = bounds
        return math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    except (TypeError, ValueError):
        return False


__all__ = ["SinusoidTasks", "fixed_sinusoid_tasks"]
