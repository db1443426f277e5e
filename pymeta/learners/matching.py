"""Matching Networks (Vinyals et al. 2016), with optional full-context embeddings."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_count, check_positive_float
from ..ops import pairwise_distances
from .base import FewShotLearner, as_vectors, full_precision, in_weight_dtype, upcast


class MatchingNet(FewShotLearner):
    """Classifies a query by cosine attention over the support set.

    a = softmax over supports of s * cos(f(query), g(support)); p(class c) = the attention on
    class c's supports; logits = log p, trained with NLL.

    The paper's attention is ``s = 1``. Cosines lie in [-1, 1] (in [0, 1] after a ReLU
    backbone), so with ``s = 1`` no attention can be sharper than e^2 : 1 between supports:
    at 60 ways the best possible correct-class probability is about 0.11 and training
    stalls (bench/RESULTS.md: Omniglot 67% at 5-way 1-shot). The scale is learned (as
    log s) from ``scale=60``, which scored best on Omniglot after a short run (s = 10: 88%,
    60 or 150: 93%); pass ``scale=1, learn_scale=False`` for the paper's head.

    With ``fce=True`` (full-context embeddings, the paper's appendix) the support embeddings
    become g = embedding + bidirectional LSTM over the support set, and the query embedding
    f comes out of an LSTM run for ``fce_steps`` steps that attends over g each step. The
    step's read-out is fed to the LSTM with the query embedding (the paper concatenates it
    to the hidden state instead; a common equivalent-in-spirit variant).

    Args:
        backbone: any module mapping ``[B, *sample]`` to ``[B, *feature]`` (flattened).
        fce: use full-context embeddings.
        fce_steps: attention-LSTM processing steps K.
        feature_dim: embedding size D (flattened backbone output), required when ``fce``;
            ``pymeta.nn.feature_dim(backbone, sample_shape)`` computes it.
        scale: the attention's inverse temperature s (initial value when learned).
        learn_scale: meta-learn s with the rest of the network.

    Example:
        >>> import torch
        >>> from pymeta.nn import Conv4
        >>> learner = MatchingNet(Conv4(hidden=8, out_channels=8), fce=True, feature_dim=8)
        >>> sx, qx = torch.randn(1, 4, 1, 28, 28), torch.randn(1, 3, 1, 28, 28)
        >>> sy, qy = torch.tensor([[1, 0, 1, 1]]), torch.tensor([[0, 1, 1]])
        >>> logits = learner(sx, sy, qx, ways=2)   # log-probabilities
        >>> bool(torch.allclose(logits.exp().sum(-1), torch.ones(1, 3)))
        True
        >>> loss, _ = learner.loss(sx, sy, qx, qy, ways=2)
    """

    algo = "matching"

    def __init__(self, backbone: nn.Module, fce: bool = False, fce_steps: int = 5,
                 feature_dim: Optional[int] = None, scale: float = 60.0,
                 learn_scale: bool = True) -> None:
        super().__init__(backbone)
        scale = check_positive_float("MatchingNet", "scale", scale)
        fce = check_bool("MatchingNet", "fce", fce)
        if fce and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int)
                    or feature_dim < 1):
            raise ValueError("MatchingNet: fce=True needs feature_dim, the backbone's flattened "
                             "output size (pymeta.nn.feature_dim(backbone, sample_shape) gives "
                             f"it), got {feature_dim!r}")
        fce_steps = check_count("MatchingNet", "fce_steps", fce_steps)
        self.fce, self.fce_steps, self.feature_dim = fce, fce_steps, feature_dim
        self.learn_scale = check_bool("MatchingNet", "learn_scale", learn_scale)
        if self.learn_scale:
            # as log s: Adam's steps are then relative, so s can move by orders of magnitude
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.fixed_scale = scale  # a constant, not state: exact in any dtype
        if fce:
            self.support_lstm = nn.LSTM(feature_dim, feature_dim, batch_first=True,
                                        bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * feature_dim, feature_dim)

    @property
    def scale(self) -> Tensor:
        if self.learn_scale:
            return self.log_scale.exp()
        return torch.tensor(self.fixed_scale, dtype=torch.float64)  # 0-d: takes the model's dtype

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        if not self.learn_scale:  # earlier checkpoints held a fixed scale as a buffer
            state_dict.pop(prefix + "log_scale", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _logits(self, zs: Tensor, support_y: Tensor, zq: Tensor, ways: int) -> Tensor:
        zs, zq = as_vectors(zs), as_vectors(zq)
        with full_precision(zs.device):
            if self.fce:
                zs, zq = in_weight_dtype(self.support_lstm, zs, zq)
                zs = self._context_support(zs)
                zs, zq = upcast(zs), upcast(self._context_query(zq, zs))
            cosine = 1 - pairwise_distances(zq, zs, "cosine")
            log_attention = torch.log_softmax(self.scale * cosine, -1)             # [T, Q, S]
            return _class_logsumexp(log_attention, support_y, ways)

    def _loss(self, logits: Tensor, query_y: Tensor, ways: int) -> Tensor:
        return F.nll_loss(logits.flatten(0, 1), query_y.flatten())

    def _context_support(self, zs: Tensor) -> Tensor:
        """g(x_i, S) = g'(x_i) + forward and backward LSTM states over the support set."""
        self._check_dim(zs)
        out, _ = self.support_lstm(zs)
        forward, backward = out.chunk(2, -1)
        return zs + forward + backward

    def _context_query(self, zq: Tensor, g: Tensor) -> Tensor:
        """f(x, S): K steps of an LSTM reading (by dot-product attention) the support g."""
        T, Q, D = zq.shape
        f = zq.reshape(T * Q, D)
        h, c, read = torch.zeros_like(f), torch.zeros_like(f), torch.zeros_like(f)
        for _ in range(self.fce_steps):  # processing steps, not tasks: the batch is T * Q
            h, c = self.query_cell(torch.cat([f, read], -1), (h, c))
            h = h + f
            # the kernels take no half types: attend in float32 (a model cast to half)
            attention = torch.softmax(-pairwise_distances(upcast(h.view(T, Q, D)), upcast(g),
                                                          "dot"), -1)
            read = (attention @ upcast(g)).reshape(T * Q, D).to(f.dtype)
        return h.view(T, Q, D)

    def _check_dim(self, z: Tensor) -> None:
        if z.shape[-1] != self.feature_dim:
            raise ValueError(f"MatchingNet: the backbone gives {z.shape[-1]} features but "
                             f"feature_dim={self.feature_dim}")

    def extra_config(self) -> dict:
        return {"fce": self.fce, "fce_steps": self.fce_steps, "feature_dim": self.feature_dim,
                "scale": float(self.scale.detach()), "learn_scale": self.learn_scale}


def _class_logsumexp(log_attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """log p(c) = logsumexp of the log-attention ``[T, Q, S]`` on class c's supports, exact
    at any scale (summing probabilities underflows for sharp attention). Each class is
    shifted by its own peak, so its sum of exponentials lies in [1, shots]."""
    index = support_y.unsqueeze(1).expand_as(log_attention)
    peak = log_attention.detach().new_full((*log_attention.shape[:2], ways), -math.inf)
    # finite: every class has a support (checked with the episode)
    peak = peak.scatter_reduce(-1, index, log_attention.detach(), "amax")
    mass = (log_attention - peak.gather(-1, index)).exp()
    return peak + (mass @ F.one_hot(support_y, ways).to(mass.dtype)).log()
