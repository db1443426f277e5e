"""Few-shot learners on a shared interface (:class:`FewShotLearner`): ``embed``, ``forward``
(logits ``[T, Q, ways]``) and ``loss``, all batched over tasks.

- :class:`ProtoNet` (Snell et al. 2017), :class:`MatchingNet` (Vinyals et al. 2016),
  :class:`Siamese` (Koch et al. 2015), :class:`RelationNet` (Sung et al. 2018).
- :class:`MAML`, :class:`FOMAML`, :class:`MetaSGD`, :class:`ANIL`, :class:`Reptile`: the
  gradient-based family, batched over tasks on per-task fast weights
  (:func:`batched_forward`).
- :data:`LEARNERS` / :func:`build_learner`: the registry by algorithm name.
"""
from __future__ import annotations

from torch import nn

from .base import FewShotLearner
from .functional import batched_forward, is_batchable
from .maml import ANIL, FOMAML, MAML, GradientLearner, MetaSGD
from .matching import MatchingNet
from .protonet import ProtoNet
from .relation import RelationModule, RelationNet
from .reptile import Reptile
from .siamese import Siamese, balanced_pairs

LEARNERS: dict[str, type[FewShotLearner]] = {
    "protonet": ProtoNet, "matching": MatchingNet, "siamese": Siamese, "relation": RelationNet,
    "maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL, "reptile": Reptile}


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
           "RelationModule", "balanced_pairs", "LEARNERS", "build_learner", "GradientLearner",
           "MAML", "FOMAML", "MetaSGD", "ANIL", "Reptile", "batched_forward", "is_batchable"]
