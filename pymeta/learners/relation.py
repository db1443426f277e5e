"""Relation Networks (Sung et al. 2018)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_count
from ..ops import class_prototypes
from .base import FewShotLearner, as_vectors, in_weight_dtype, upcast


def _relation_block(cin: int, cout: int) -> nn.Sequential:
    # padding 1 and ceil-mode pooling keep 1x1 maps (Conv4 on 28x28) at 1x1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))


class RelationModule(nn.Module):
    """Scores a (class, query) pair of feature maps concatenated on channels, in (0, 1).

    Two conv3x3-BN-ReLU-maxpool blocks, then FC(hidden)-ReLU-FC(1)-sigmoid. The paper
    flattens a 3x3 map into the first FC; this module global-average-pools first, so that
    any map size works (1x1 maps from Conv4 on 28x28, 5x5 on 84x84).

    Example:
        >>> import torch
        >>> RelationModule(feature_channels=4, hidden=8)(torch.randn(3, 8, 5, 5)).shape
        torch.Size([3])
    """

    def __init__(self, feature_channels: int = 64, hidden: int = 8) -> None:
        super().__init__()
        self.feature_channels = feature_channels
        self.block1 = _relation_block(2 * feature_channels, feature_channels)
        self.block2 = _relation_block(feature_channels, feature_channels)
        self.fc1 = nn.Linear(feature_channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: Tensor) -> Tensor:
        """``[N, 2C, h, w]`` (class map first, then query map) -> scores ``[N]``."""
        return self._tail(self.block1(pairs))

    def score_all(self, classes: Tensor, queries: Tensor) -> Tensor:
        """Scores ``[T, Q, W]`` of every query ``[T, Q, C, h, w]`` against every class
        ``[T, W, C, h, w]``, without materialising the ``T*Q*W`` concatenated inputs for the
        first conv: conv(concat(a, b)) = conv_a(a) + conv_b(b), so each map is convolved once."""
        (T, W), Q, C = classes.shape[:2], queries.shape[1], self.feature_channels
        conv = self.block1[0]
        a = F.conv2d(classes.flatten(0, 1), conv.weight[:, :C], padding=1)
        b = F.conv2d(queries.flatten(0, 1), conv.weight[:, C:], padding=1)
        mixed = b.unflatten(0, (T, Q)).unsqueeze(2) + a.unflatten(0, (T, W)).unsqueeze(1)
        return self._tail(self.block1[1:](mixed.flatten(0, 2))).view(T, Q, W)

    def _tail(self, x: Tensor) -> Tensor:
        x = self.block2(x).mean((-2, -1))
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1).sigmoid()


class RelationNet(FewShotLearner):
    """Learns the metric: a relation module scores each (class, query) pair of feature maps.

    The class representation is the mean of the class's support feature maps (the paper
    sums; the mean keeps the scale independent of uneven shots). Logits are the relation
    scores in (0, 1), trained by mean squared error against the one-hot query labels.

    Args:
        backbone: a module returning feature maps ``[B, C, h, w]``, e.g.
            ``pymeta.nn.Conv4(flatten=False)``.
        feature_channels: C, the backbone's output channels.
        hidden: width of the relation module's hidden FC layer.

    Example:
        >>> import torch
        >>> from pymeta.nn import Conv4
        >>> learner = RelationNet(Conv4(hidden=8, out_channels=8, flatten=False),
        ...                       feature_channels=8)
        >>> sx, qx = torch.randn(2, 4, 1, 28, 28), torch.randn(2, 3, 1, 28, 28)
        >>> sy, qy = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([[0, 1, 1]] * 2)
        >>> learner(sx, sy, qx, ways=2).shape
        torch.Size([2, 3, 2])
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=2)
    """

    algo = "relation"

    def __init__(self, backbone: nn.Module, feature_channels: int = 64, hidden: int = 8) -> None:
        super().__init__(backbone)
        self.feature_channels = check_count("RelationNet", "feature_channels", feature_channels)
        self.hidden = check_count("RelationNet", "hidden", hidden)
        self.relation = RelationModule(self.feature_channels, self.hidden)

    def _logits(self, zs: Tensor, support_y: Tensor, zq: Tensor, ways: int) -> Tensor:
        if zs.ndim != 5 or zs.shape[2] != self.feature_channels:
            raise ValueError(f"RelationNet: the backbone must return feature maps "
                             f"[C={self.feature_channels}, h, w] (e.g. Conv4(flatten=False)), "
                             f"got per-sample shape {list(zs.shape[2:])}")
        maps = zs.shape[2:]
        classes = class_prototypes(as_vectors(zs), support_y, ways, validate=False)
        classes, zq = in_weight_dtype(self.relation, classes.unflatten(-1, maps), zq)
        return upcast(self.relation.score_all(classes, zq))

    def _loss(self, logits: Tensor, query_y: Tensor, ways: int) -> Tensor:
        return F.mse_loss(logits, F.one_hot(query_y, ways).to(logits.dtype))

    def extra_config(self) -> dict:
        return {"feature_channels": self.feature_channels, "hidden": self.hidden}
