"""Few-shot learners on a shared interface (:class:`FewShotLearner`): ``embed``, ``forward``
(logits ``[T, Q, ways]``) and ``loss``, all batched over tasks.

- :class:`ProtoNet` (Snell et al. 2017), :class:`MatchingNet` (Vinyals et al. 2016),
  :class:`Siamese` (Koch et al. 2015), :class:`RelationNet` (Sung et al. 2018).
- :data:`LEARNERS` / :func:`build_learner`: the registry by algorithm name.
"""
from __future__ import annotations

from torch import nn

from .base import FewShotLearner
from .matching import MatchingNet
from .protonet import ProtoNet
from .relation import RelationModule, RelationNet
from .siamese import Siamese, balanced_pairs

LEARNERS: dict[str, type[FewShotLearner]] = {
    "protonet": ProtoNet, "matching": MatchingNet, "siamese": Siamese, "relation": RelationNet}


def build_learner(algo: str, backbone: nn.Module, **kwargs) -> FewShotLearner:
    """A learner by registry name, e.g. ``build_learner("protonet", Conv4(), metric="cosine")``;
    ``build_learner(l.algo, backbone, **l.extra_config())`` rebuilds learner ``l``.

    Example:
        >>> from pymeta.nn import Conv4
        >>> build_learner("relation", Conv4(flatten=False)).algo
        'relation'
    """
    if algo not in LEARNERS:
        raise ValueError(f"unknown learner {algo!r}; choose one of {sorted(LEARNERS)}")
    return LEARNERS[algo](backbone, **kwargs)


__all__ = ["FewShotLearner", "ProtoNet", "MatchingNet", "Siamese", "RelationNet",
           "RelationModule", "balanced_pairs", "LEARNERS", "build_learner"]
