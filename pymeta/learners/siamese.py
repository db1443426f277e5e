"""Siamese networks for one-shot classification (Koch et al. 2015)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .._checks import check_count
from ..ops import pairwise_distances
from .base import FewShotLearner, as_vectors, full_precision, in_weight_dtype, upcast

HEADS = ("l1", "euclidean")
LOSSES = ("bce", "contrastive")


def balanced_pairs(support_y: Tensor, query_y: Tensor, pairs_per_query: int = 1,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Samples as many same-class as different-class (query, support) pairs, for all tasks.

    Each query gets ``pairs_per_query`` supports of its own class and as many of other
    classes, drawn uniformly with replacement, so every task has exactly as many positive
    as negative pairs however uneven its shots.

    Args:
        support_y: integer labels ``[T, S]``.
        query_y: integer labels ``[T, Q]``.
        pairs_per_query: positive (and negative) pairs drawn per query.
        generator: random generator (on the labels' device) for reproducible draws.

    Returns:
        ``(q_idx, s_idx, same)``, each ``[T, 2 * Q * pairs_per_query]``: pair ``j`` of task
        ``t`` is query ``q_idx[t, j]`` with support ``s_idx[t, j]``; ``same`` (bool) tells
        whether their labels match: the first half of each row is positive, the rest negative.

    Example:
        >>> sy = torch.tensor([[0, 0, 1]])
        >>> qy = torch.tensor([[1, 0]])
        >>> q, s, same = balanced_pairs(sy, qy, generator=torch.Generator().manual_seed(0))
        >>> q.tolist(), same.tolist()
        ([[0, 1, 0, 1]], [[True, True, False, False]])
        >>> bool((sy[0, s[0]] == qy[0, q[0]]).eq(same[0]).all())
        True
    """
    matches = _check_pair_labels(support_y, query_y, pairs_per_query)     # [T, Q, S]
    (T, Q, _), k = matches.shape, pairs_per_query
    weights = matches.flatten(0, 1).float()
    pos = torch.multinomial(weights, k, replacement=True, generator=generator)
    neg = torch.multinomial(1 - weights, k, replacement=True, generator=generator)
    q_half = torch.arange(Q, device=support_y.device).repeat_interleave(k).expand(T, Q * k)
    q_idx = torch.cat([q_half, q_half], 1)
    s_idx = torch.cat([pos.view(T, Q * k), neg.view(T, Q * k)], 1)
    same = torch.arange(2 * Q * k, device=support_y.device).expand(T, -1) < Q * k
    return q_idx, s_idx, same


def _check_pair_labels(support_y: Tensor, query_y: Tensor, k: int) -> Tensor:
    for name, y in (("support_y", support_y), ("query_y", query_y)):
        if not isinstance(y, Tensor) or y.ndim != 2 or y.is_floating_point() or \
                y.is_complex() or y.dtype == torch.bool:
            what = f"{y.dtype} {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"balanced_pairs: {name} must be an integer tensor [T, n], "
                             f"got {what}")
    if support_y.shape[0] != query_y.shape[0] or support_y.device != query_y.device:
        raise ValueError(f"balanced_pairs: support_y {list(support_y.shape)} and query_y "
                         f"{list(query_y.shape)} need the same task count and device")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"balanced_pairs: pairs_per_query must be a positive int, got {k!r}")
    matches = query_y.unsqueeze(-1) == support_y.unsqueeze(-2)           # [T, Q, S]
    positives = matches.sum(-1)
    lacking = torch.stack([(positives == 0).any(), (positives == support_y.shape[1]).any()])
    no_pos, no_neg = lacking.tolist()
    if no_pos or no_neg:
        t, q = ((positives == 0) if no_pos else (positives == support_y.shape[1])).nonzero()[0]
        kind = "same" if no_pos else "another"
        raise ValueError(f"balanced_pairs: query {int(q)} of task {int(t)} (class "
                         f"{int(query_y[t, q])}) has no support of {kind} class to pair with")
    return matches


class Siamese(FewShotLearner):
    """Scores (query, support) pairs; a query's class logit is its best pair score in that class.

    Heads (pair logit s, higher = more alike):

    - ``"l1"`` (Koch et al.): s = w . |e1 - e2| + b, a learned weighted L1 distance.
    - ``"euclidean"``: s = a * ||e1 - e2|| + b with learned scalars (a starts at -1).

    With ``loss="contrastive"`` (Hadsell et al. 2006) the head has no parameters: the pair
    distance d is the L1 (``"l1"``) or euclidean (``"euclidean"``) distance, s = -d, and
    the loss is same * d^2 + (1 - same) * max(0, margin - d)^2. With ``loss="bce"`` the
    loss is binary cross entropy of sigmoid(s). Training pairs come from
    :func:`balanced_pairs` (as many positive as negative pairs per task); the logits
    returned by :meth:`forward` and :meth:`loss` score every pair:
    logits[t, q, c] = max over class-c supports of s. (The ``"l1"`` BCE head scores every
    pair from ``|e1 - e2|``, a transient ``[T, Q, S, D]`` tensor; the other heads use
    distance kernels and need only ``[T, Q, S]``.)

    Args:
        backbone: any module mapping ``[B, *sample]`` to ``[B, *feature]`` (flattened).
        head: ``"l1"`` or ``"euclidean"``.
        loss: ``"bce"`` or ``"contrastive"``.
        margin: contrastive margin.
        feature_dim: embedding size D for the ``"l1"`` BCE head; if None the head is a
            ``LazyLinear`` (run one forward before building the optimizer).
        pairs_per_query: positive (and negative) pairs drawn per query for the loss.

    Example:
        >>> import torch
        >>> from pymeta.nn import Conv4
        >>> learner = Siamese(Conv4(hidden=8, out_channels=8), feature_dim=8)
        >>> sx, qx = torch.randn(2, 3, 1, 28, 28), torch.randn(2, 2, 1, 28, 28)
        >>> sy, qy = torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.tensor([[1, 2], [0, 0]])
        >>> learner(sx, sy, qx, ways=3).shape
        torch.Size([2, 2, 3])
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=3)
    """

    algo = "siamese"

    def __init__(self, backbone: nn.Module, head: str = "l1", loss: str = "bce",
                 margin: float = 1.0, feature_dim: Optional[int] = None,
                 pairs_per_query: int = 1) -> None:
        super().__init__(backbone)
        if head not in HEADS:
            raise ValueError(f"Siamese: unknown head {head!r}; choose one of {list(HEADS)}")
        if loss not in LOSSES:
            raise ValueError(f"Siamese: unknown loss {loss!r}; choose one of {list(LOSSES)}")
        check_count("Siamese", "pairs_per_query", pairs_per_query)
        if feature_dim is not None:
            check_count("Siamese", "feature_dim", feature_dim, " or None")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"Siamese: margin must be a number >= 0, got {margin!r}")
        self.head, self.pair_loss, self.margin = head, loss, float(margin)
        self.feature_dim = None if feature_dim is None else int(feature_dim)  # JSON-friendly
        self.pairs_per_query = int(pairs_per_query)
        self.scorer = self._make_scorer() if loss == "bce" else None

    def _make_scorer(self) -> nn.Module:
        if self.head == "euclidean":
            scorer = nn.Linear(1, 1)
            with torch.no_grad():  # start as "closer = more alike"
                scorer.weight.fill_(-1.0)
                scorer.bias.fill_(1.0)
            return scorer
        return nn.LazyLinear(1) if self.feature_dim is None else nn.Linear(self.feature_dim, 1)

    def pair_logits(self, zs: Tensor, zq: Tensor) -> Tensor:
        """Pair logits ``[T, Q, S]`` from embeddings: support ``[T, S, D]``, query ``[T, Q, D]``."""
        if self.scorer is None:
            return -self._distances(zs, zq)
        if self.head == "l1":
            width = getattr(self.scorer, "in_features", 0)  # 0: a LazyLinear not yet sized
            if width and zs.shape[-1] != width:
                raise ValueError(f"Siamese: the backbone gives {zs.shape[-1]} features but "
                                 f"the l1 head takes feature_dim={width}")
            return self._score((zq.unsqueeze(2) - zs.unsqueeze(1)).abs())
        return self._score(self._distances(zs, zq).unsqueeze(-1))

    def _score(self, features: Tensor) -> Tensor:
        if is_lazy(self.scorer.weight):  # first call: sized in the backbone's dtype, with
            with torch.inference_mode(False):  # trainable weights even under inference_mode
                self.scorer.to(next(self.backbone.parameters(), features).dtype)
                w = self.scorer.weight
                self.scorer(torch.zeros(features.shape[-1], dtype=w.dtype, device=w.device))
        return upcast(self.scorer(*in_weight_dtype(self.scorer, features)).squeeze(-1))

    def _distances(self, zs: Tensor, zq: Tensor) -> Tensor:
        if self.head == "l1":
            return torch.cdist(zq, zs, p=1)
        return pairwise_distances(zq, zs, "euclidean")

    def _logits(self, zs: Tensor, support_y: Tensor, zq: Tensor, ways: int) -> Tensor:
        return self._scores(zs, support_y, zq, ways)[1]

    def _scores(self, zs: Tensor, support_y: Tensor, zq: Tensor,
                ways: int) -> tuple[Tensor, Tensor]:
        """(pair logits [T, Q, S], class logits [T, Q, ways])."""
        zs, zq = as_vectors(zs), as_vectors(zq)
        with full_precision(zs.device):
            pairs = self.pair_logits(zs, zq)
        index = support_y.unsqueeze(1).expand_as(pairs)
        best = pairs.new_full((*pairs.shape[:2], ways), float("-inf"))
        return pairs, best.scatter_reduce(-1, index, pairs, "amax", include_self=False)

    def loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             ways: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(Pair loss on :func:`balanced_pairs` drawn with ``generator``, logits [T, Q, ways])."""
        self._check_episode(support_x, support_y, query_x, ways, query_y)
        zs, zq = self._embed_episode(support_x, query_x)
        pairs, logits = self._scores(zs, support_y.long(), zq, ways)
        q_idx, s_idx, same = balanced_pairs(support_y, query_y, self.pairs_per_query, generator)
        picked = pairs.flatten(1).gather(1, q_idx * pairs.shape[-1] + s_idx)   # [T, P]
        return self._pair_loss(picked, same.to(picked.dtype)), logits

    def _pair_loss(self, s: Tensor, same: Tensor) -> Tensor:
        if self.pair_loss == "bce":
            return F.binary_cross_entropy_with_logits(s, same)
        d = -s
        return (same * d.square() + (1 - same) * F.relu(self.margin - d).square()).mean()

    def extra_config(self) -> dict:
        dim = self.feature_dim
        if dim is None and isinstance(self.scorer, nn.Linear) and self.head == "l1" and \
                not isinstance(self.scorer.weight, nn.parameter.UninitializedParameter):
            dim = self.scorer.in_features  # a materialised LazyLinear
        return {"head": self.head, "loss": self.pair_loss, "margin": self.margin,
                "feature_dim": dim, "pairs_per_query": self.pairs_per_query}
