"""Prototypical Networks (Snell et al. 2017)."""
from __future__ import annotations

from torch import Tensor, nn

from ..ops import METRICS, class_prototypes, pairwise_distances
from .base import FewShotLearner, as_vectors


class ProtoNet(FewShotLearner):
    """Classifies a query by its distance to each class's mean support embedding.

    logits = -distance(query embedding, prototype); trained with cross entropy.

    Args:
        backbone: any module mapping ``[B, *sample]`` to ``[B, *feature]`` (flattened).
        metric: ``"sqeuclidean"`` (the paper's), ``"euclidean"``, ``"cosine"`` or ``"dot"``.

    Example:
        >>> import torch
        >>> from pymeta.nn import Conv4
        >>> learner = ProtoNet(Conv4(hidden=8, out_channels=8))
        >>> sx, qx = torch.randn(2, 6, 1, 28, 28), torch.randn(2, 4, 1, 28, 28)
        >>> sy = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, 0, 1]])  # uneven shots are fine
        >>> qy = torch.tensor([[0, 1, 2, 2], [1, 0, 0, 2]])
        >>> learner(sx, sy, qx, ways=3).shape
        torch.Size([2, 4, 3])
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=3)
        >>> loss.backward()
    """

    algo = "protonet"

    def __init__(self, backbone: nn.Module, metric: str = "sqeuclidean") -> None:
        super().__init__(backbone)
        if metric not in METRICS:
            raise ValueError(f"ProtoNet: unknown metric {metric!r}; "
                             f"choose one of {sorted(METRICS)}")
        self.metric = metric

    def _logits(self, zs: Tensor, support_y: Tensor, zq: Tensor, ways: int) -> Tensor:
        zs, zq = as_vectors(zs), as_vectors(zq)
        protos = class_prototypes(zs, support_y, ways, validate=False)  # labels checked already
        return -pairwise_distances(zq, protos, self.metric)

    def extra_config(self) -> dict:
        return {"metric": self.metric}
