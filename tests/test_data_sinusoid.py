"""Sinusoid regression tasks: MAML's distribution, seeded, and checked arguments."""
import math

import pytest
import torch

from pymeta.data import SinusoidTasks, fixed_sinusoid_tasks


def test_targets_are_the_tasks_sine_waves():
    ep = SinusoidTasks(shots=10, queries=7, tasks=50, seed=3)[4]
    amp, phase = ep.classes[:, 0], ep.classes[:, 1]
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        ref = amp.view(-1, 1, 1) * torch.sin(x.double() - phase.view(-1, 1, 1))
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert ep.ways is None and ep.tasks == 50
    assert ep.support_x.shape == (50, 10, 1) and ep.query_x.shape == (50, 7, 1)


def test_distribution_ranges_match_maml():
    ep = SinusoidTasks(shots=20, queries=20, tasks=4000, seed=0)[0]
    amp, phase = ep.classes[:, 0], ep.classes[:, 1]
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and phase.min() >= 0 and phase.max() <= math.pi
    # uniform: means near the midpoints (4000 draws: standard error ~0.02 and ~0.014)
    assert abs(amp.mean() - 2.55) < 0.1 and abs(phase.mean() - math.pi / 2) < 0.07
    x = torch.cat([ep.support_x, ep.query_x], 1)
    assert x.min() >= -5 and x.max() <= 5 and abs(float(x.mean())) < 0.05


def test_items_depend_only_on_seed_and_index():
    a, b = SinusoidTasks(5, 5, tasks=3, seed=1), SinusoidTasks(5, 5, tasks=3, seed=1)
    assert torch.equal(a[7].support_x, b[7].support_x)
    assert not torch.equal(a[7].support_x, a[8].support_x)
    assert not torch.equal(a[7].support_x, SinusoidTasks(5, 5, tasks=3, seed=2)[7].support_x)


def test_fixed_test_set():
    tasks = fixed_sinusoid_tasks(n=1000)
    assert len(tasks) == 1 and tasks.shots == 5 and tasks.queries == 100
    assert tasks[0].query_x.shape == (1000, 100, 1)
    with pytest.raises(IndexError, match="out of range"):
        tasks[1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(shots=0, queries=5), "shots must be a positive int"),
    (dict(shots=5, queries=2.5), "queries must be a positive int"),
    (dict(shots=5, queries=5, tasks=True), "tasks must be a positive int"),
    (dict(shots=5, queries=5, amplitude=(5, 1)), "amplitude must be"),
    (dict(shots=5, queries=5, seed=1.7), "seed must be an int >= 0, got 1.7"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=-3), "length must be an int >= 0, got -3"),
    (dict(length=2.7), "length must be an int >= 0, got 2.7"),
    (dict(length=True), "length must be an int >= 0, got True"),
    (dict(amplitude=(0.1, math.inf)), "amplitude must be finite"),
    (dict(x_range=(1,)), r"x_range must be finite \(low, high\) with low <= high, got \(1,\)"),
    (dict(phase=[0, 1, 2]), r"phase must be finite .*got \[0, 1, 2\]"),
    (dict(amplitude="ab"), "amplitude must be finite"),
])
def test_bad_lengths_ranges_and_indices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(5, 5, **kwargs)
    with pytest.raises(ValueError, match="task batch index must be an int >= 0, got 0.5"):
        SinusoidTasks(5, 5)[0.5]
