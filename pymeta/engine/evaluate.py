"""Accuracy of a few-shot learner on fixed episodes and on Lake's one-shot runs."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..data.classes import ImageClasses
from ..data.episodes import Episode, EpisodeSampler
from .metrics import mean_ci95


def autocast(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {None, "bf16", "fp16"}."""
    if amp is None:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {sorted(dtypes)} or None, got {amp!r}")
    return torch.autocast(device.type, dtype=dtypes[amp])


def _batches(sampler: EpisodeSampler, batch: int | None):
    # One-task evaluation episodes are stacked into multi-task batches: with BatchNorm in
    # eval mode the tasks do not interact, so the scores are those of one episode at a time.
    # About 640 images a batch: bigger activations fall out of cache and cost page faults.
    per_episode = sampler.ways * (sampler.shots + sampler.queries)
    batch = batch or max(1, 640 // per_episode)
    for start in range(0, len(sampler), batch):
        eps = [sampler[i] for i in range(start, min(start + batch, len(sampler)))]
        yield Episode(*(torch.cat([getattr(e, f) for e in eps]) for f in
                        ("support_x", "support_y", "query_x", "query_y")), eps[0].ways,
                      torch.cat([e.classes for e in eps]))


@torch.no_grad()
def episode_accuracies(learner, sampler: EpisodeSampler, device="cpu", amp=None,
                       batch: int | None = None, progress: bool = False) -> torch.Tensor:
    """Per-episode query accuracy, float64 ``[len(sampler) * sampler.tasks]``."""
    device = torch.device(device)
    was_training = learner.training
    learner.eval()
    accs = []
    try:
        bar = tqdm(total=len(sampler), desc="eval", unit="ep", disable=not progress,
                   leave=False)
        for ep in _batches(sampler, batch):
            ep = ep.to(device)
            with autocast(device, amp):
                logits = learner(ep.support_x, ep.support_y, ep.query_x, ep.ways)
            accs.append((logits.argmax(-1) == ep.query_y).double().mean(-1).cpu())
            bar.update(ep.tasks)
        bar.close()
    finally:
        learner.train(was_training)
    return torch.cat(accs)


def evaluate(learner, sampler: EpisodeSampler, device="cpu", amp=None, batch: int | None = None,
             progress: bool = False) -> dict:
    """Mean query accuracy ± 95% CI over the sampler's episodes."""
    accs = episode_accuracies(learner, sampler, device, amp, batch, progress)
    acc, ci = mean_ci95(accs)
    return {"acc": acc, "ci95": ci, "episodes": accs.numel()}


@torch.no_grad()
def evaluate_runs(learner, runs, device="cpu") -> dict:
    """Lake et al.'s one-shot error: each run is a 20-way task, one image per class.

    Returns the mean error % over the runs and each run's error %.
    """
    if not runs:
        raise ValueError("no one-shot runs to evaluate")
    device = torch.device(device)
    was_training = learner.training
    learner.eval()
    try:
        support = torch.stack([ImageClasses.to_float(r.support) for r in runs]).to(device)
        query = torch.stack([ImageClasses.to_float(r.query) for r in runs]).to(device)
        answers = torch.stack([r.answers for r in runs]).to(device)
        ways = support.shape[1]
        labels = torch.arange(ways, device=device).expand(len(runs), ways)
        pred = learner(support, labels, query, ways).argmax(-1)
    finally:
        learner.train(was_training)
    errors = (pred != answers).double().mean(-1).mul(100).cpu()
    return {"error": float(errors.mean()), "runs": {r.name: float(e)
                                                    for r, e in zip(runs, errors)}}
