"""Plain-torch reference implementations of every pymeta op.

They define the ops' semantics, are differentiable to any order through torch autograd, and
are what the tests check the compiled kernels against. They are also used for the
double-backward of ``pairwise_distances``, whose second derivative is rarely on a hot path:
so they avoid matmuls, whose rounding depends on the thread count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8


def pairwise_distances(x: torch.Tensor, y: torch.Tensor,
                       metric: str = "sqeuclidean") -> torch.Tensor:
    """[..., Q, D] x [..., N, D] -> [..., Q, N] by broadcast-subtract or inner products."""
    if metric in ("sqeuclidean", "euclidean"):
        sq = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
        if metric == "sqeuclidean":
            return sq
        # sqrt with gradient 0 at zero distance, as torch.cdist (NaN stays NaN)
        nonzero = sq != 0
        return torch.where(nonzero, torch.where(nonzero, sq, 1).sqrt(), 0)
    if metric == "dot":
        return -_inner(x, y)
    if metric == "cosine":
        nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        return 1 - _inner(x / nx, y / ny)
    raise ValueError(f"unknown metric {metric!r}")


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inner products of every row pair, ``[..., Q, N]``, as a product summed over features:
    unlike a matmul (and its backward), it rounds alike at any thread count, which the ops'
    second derivatives, computed through here, then keep."""
    return (x.unsqueeze(-2) * y.unsqueeze(-3)).sum(-1)


def pairwise_distances_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`pairwise_distances`, itself differentiable."""
    _, vjp = torch.func.vjp(lambda a, b: pairwise_distances(a, b, metric), x, y)
    return vjp(grad)


def class_prototypes(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class means [..., C, D] by a masked sum; empty classes give NaN. (A one-hot
    matrix product would spread a NaN in one example to every class: 0 * NaN = NaN.)"""
    classes = torch.arange(num_classes, device=labels.device)
    member = labels.unsqueeze(-1) == classes  # [..., S, C]
    sums = torch.where(member.unsqueeze(-1), z.unsqueeze(-2), 0).sum(-3)  # [..., C, D]
    return sums / member.sum(-2).unsqueeze(-1).to(z.dtype)


def sgd_step(params, grads, lr):
    """[p - lr * g for each tensor]; ``lr`` is a float or a list of broadcastable tensors."""
    lrs = lr if isinstance(lr, (list, tuple)) else [lr] * len(params)
    return [p - a * g for p, g, a in zip(params, grads, lrs)]


def batch_norm_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max_pool2d(relu(batch_norm(x))), batch mean, biased batch variance), torch's own ops."""
    dims = (0, 2, 3)
    out = F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), 2)
    x = x.detach()  # not no_grad(): an exported graph keeps a no_grad block it cannot reload
    return out, x.mean(dims), x.var(dims, unbiased=False)
