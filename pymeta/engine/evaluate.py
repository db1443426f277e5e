"""Scores of a few-shot learner on fixed episodes (accuracy, or MSE for regression) and on
Lake's one-shot runs."""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .._checks import check_count
from ..data.classes import ImageClasses
from ..data.episodes import Episode
from ..nn import evaluating
from .distributed import all_gather_objects, rank_and_world
from .metrics import mean_ci95


def autocast(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {None, "bf16", "fp16"}."""
    if amp is None:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {sorted(dtypes)} or None, got {amp!r}")
    return torch.autocast(device.type, dtype=dtypes[amp])


def metric_name(learner) -> str:
    """The score a run reports: ``"acc"`` (query accuracy, higher is better) or ``"mse"``
    (query mean squared error of regressing learners, ``loss="mse"``; lower is better)."""
    return "mse" if getattr(learner, "loss_name", None) == "mse" else "acc"


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether score ``new`` improves on ``old`` (None: nothing to beat yet); NaN and inf
    never do (a diverged regression scores NaN or inf)."""
    if not math.isfinite(new):
        return False
    return old is None or (new < old if metric == "mse" else new > old)


def task_scores(out: torch.Tensor, query_y: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-task query accuracy or MSE (``metric``), float64 ``[T]``. A task with a NaN
    logit scores NaN: argmax would read it as class 0 and report chance, not divergence."""
    if metric == "mse":
        return (out.double() - query_y.double()).square().flatten(1).mean(1)
    acc = (out.argmax(-1) == query_y).double().mean(-1)
    return acc.masked_fill(out.isnan().flatten(1).any(1), math.nan)


def _batch_ranges(sampler, batch: int | None) -> list[range]:
    """The episodes of each evaluation batch."""
    if sampler.ways is None:  # regression: every item already holds many tasks
        return [range(i, i + 1) for i in range(len(sampler))]
    # One-task evaluation episodes are stacked into multi-task batches: with BatchNorm in
    # eval mode the tasks do not interact, so the scores are those of one episode at a time.
    # About 640 images a batch: bigger activations fall out of cache and cost page faults.
    per_episode = sampler.ways * (sampler.shots + sampler.queries)
    batch = batch or max(1, 640 // per_episode)
    return [range(i, min(i + batch, len(sampler))) for i in range(0, len(sampler), batch)]


def _assemble(sampler, episodes: range) -> Episode:
    eps = [sampler[i] for i in episodes]
    if len(eps) == 1:
        return eps[0]
    return Episode(*(torch.cat([getattr(e, f) for e in eps]) for f in
                     ("support_x", "support_y", "query_x", "query_y")), eps[0].ways,
                   torch.cat([e.classes for e in eps]))


@torch.no_grad()
def episode_scores(learner, sampler, device="cpu", amp=None, batch: int | None = None,
                   progress: bool = False, steps: int | None = None,
                   shard: bool = False) -> torch.Tensor:
    """Per-task query accuracy (or MSE for regression), float64 ``[tasks]``.

    ``steps``: inner steps at test time for gradient-based learners (default: theirs).
    ``shard``: in a ``torch.distributed`` process group, each process scores its share of
    the batches and every process returns all the scores (the same as one process's).
    """
    if len(sampler) == 0:
        raise ValueError("no episodes to evaluate: the sampler is empty")
    if batch is not None:
        check_count("evaluate", "batch", batch, " or None (automatic)")
    if steps is not None and not hasattr(learner, "test_steps"):
        raise ValueError(f"{type(learner).__name__} does not adapt at test time; "
                         f"steps only apply to gradient-based learners")
    device = torch.device(device)
    metric = metric_name(learner)
    kwargs = {} if steps is None else {"steps": steps}
    rank, world = rank_and_world() if shard else (0, 1)
    ranges = _batch_ranges(sampler, batch)[rank::world]
    scores = []
    with evaluating(learner):
        bar = tqdm(total=sum(map(len, ranges)) * sampler.tasks, desc="eval", unit="task",
                   disable=not progress, leave=False)
        for episodes in ranges:
            ep = _assemble(sampler, episodes).to(device)
            with autocast(device, amp):
                out = learner(ep.support_x, ep.support_y, ep.query_x, ep.ways, **kwargs)
            scores.append(task_scores(out, ep.query_y, metric).cpu())
            bar.update(ep.tasks)
        bar.close()
    if world > 1:  # batch j was scored by process j % world, as its (j // world)-th
        shares = all_gather_objects(scores)
        scores = [shares[j % world][j // world] for j in range(sum(map(len, shares)))]
    return torch.cat(scores)


def evaluate(learner, sampler, device="cpu", amp=None, batch: int | None = None,
             progress: bool = False, steps: int | None = None, shard: bool = False) -> dict:
    """Mean query accuracy (key ``"acc"``) or MSE (``"mse"``, regression) ± 95% CI over the
    sampler's tasks, and how many tasks ``"diverged"`` (scored NaN or inf: one is enough to
    make the mean NaN or inf); ``steps`` and ``shard`` as in :func:`episode_scores`."""
    scores = episode_scores(learner, sampler, device, amp, batch, progress, steps, shard)
    mean, ci = mean_ci95(scores)
    return {metric_name(learner): mean, "ci95": ci, "episodes": scores.numel(),
            "diverged": int((~scores.isfinite()).sum())}


def divergence_note(res: dict) -> str:
    """`` (N of M tasks diverged)`` when an evaluation had non-finite task scores, else ``""``:
    the reason a mean is NaN or inf, which a gradient learner's too-large test-time inner
    rate or extra test steps can cause."""
    n = res.get("diverged", 0)
    return f" ({n} of {res['episodes']} tasks diverged)" if n else ""


@torch.no_grad()
def evaluate_runs(learner, runs, device="cpu") -> dict:
    """Lake et al.'s one-shot error: each run is a 20-way task, one image per class.

    Returns the mean error % over the runs and each run's error %.
    """
    if not runs:
        raise ValueError("no one-shot runs to evaluate")
    device = torch.device(device)
    groups: dict = {}  # runs of one size are scored as one batch of tasks
    for i, r in enumerate(runs):
        groups.setdefault((tuple(r.support.shape), tuple(r.query.shape)), []).append(i)
    errors = torch.zeros(len(runs), dtype=torch.float64)
    with evaluating(learner):
        for members in groups.values():
            errors[members] = _run_errors(learner, [runs[i] for i in members], device)
    return {"error": float(errors.mean()), "runs": {r.name: float(e)
                                                    for r, e in zip(runs, errors)}}


def _run_errors(learner, runs, device: torch.device) -> torch.Tensor:
    """Error % of each of ``runs``, which have the same numbers of classes and queries."""
    support = torch.stack([ImageClasses.to_float(r.support) for r in runs]).to(device)
    query = torch.stack([ImageClasses.to_float(r.query) for r in runs]).to(device)
    answers = torch.stack([r.answers for r in runs]).to(device)
    ways = support.shape[1]
    labels = torch.arange(ways, device=device).expand(len(runs), ways)
    pred = learner(support, labels, query, ways).argmax(-1)
    return (pred != answers).double().mean(-1).mul(100).cpu()
