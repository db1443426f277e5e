"""``batch_norm_relu_pool``: training-mode BatchNorm, ReLU and 2x2 max-pooling in one pass.

Kernel: ``csrc/cpu/batch_norm_relu_pool_cpu.cpp`` (CPU only). It is conv4's block tail
(conv - BatchNorm - ReLU - max-pool) after the convolution. Forward keeps only its input:
backward recomputes each window's normalised values and winner, so the normalised map, the
ReLU output and the max-pool indices (2.4x the input's size) are never stored. The backward
is a kernel too, and so is its own backward (the analytic second derivative), so the op
serves second-order MAML's inner steps; a third derivative raises.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .. import _C
from . import reference
from ._kernels import (DTYPE_CODES, autocast_float32, batched, check_float_tensors, dense,
                       functorch_active, launch, ptr, recording, reference_vjp, shape_str,
                       wrapped)

_OP = "batch_norm_relu_pool"


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps) -> None:
    check_float_tensors(_OP, numpy=False, x=x, weight=weight, bias=bias)  # it trains networks
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{_OP}: eps must be a positive float, got {eps!r}")
    if x.is_cuda:
        raise ValueError(f"{_OP}: CPU tensors only; on CUDA use torch's batch_norm, relu and "
                         "max_pool2d")
    if x.ndim != 4:
        raise ValueError(f"{_OP}: x must be [N, C, H, W], got {shape_str(x.shape)}")
    N, C, H, W = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"{_OP}: {name} must be [{C}] (x's channels), got "
                             f"{shape_str(t.shape)}")
    if H < 2 or W < 2:
        raise ValueError(f"{_OP}: 2x2 pooling needs H and W >= 2, got x {shape_str(x.shape)}")
    if N * H * W < 2:
        raise ValueError(f"{_OP}: expected more than 1 value per channel in training, got x "
                         f"{shape_str(x.shape)}")


def _code(x: torch.Tensor) -> tuple:
    """The kernels' leading arguments: launch, dtype code and the NHWC sizes N, H, W, C."""
    N, C, H, W = x.shape
    return (*launch(x), DTYPE_CODES[x.dtype], N, H, W, C)


def _empty(like: torch.Tensor, wanted: bool):
    return torch.empty_like(like) if wanted else None


class _BatchNormReluPool(torch.autograd.Function):
    """Forward kernel; its backward is :class:`_Backward`, itself differentiable once more."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        N, C, H, W = x.shape
        out = torch.empty(N, C, H // 2, W // 2, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        stats = torch.empty(2, C, dtype=torch.float64, device=x.device)
        _C.batch_norm_relu_pool_forward(*_code(x), ptr(x), ptr(weight), ptr(bias), eps, ptr(out),
                                        ptr(stats[0]), ptr(stats[1]))
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps = eps
        mean, var = stats.to(x.dtype, copy=True)  # not views of the saved float64 stats
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, stats = ctx.saved_tensors
        if batched(grad_out):  # autograd's own vmap (jacobian(vectorize=True)): torch's ops
            grads = reference_vjp(lambda *a: reference.batch_norm_relu_pool(*a, ctx.eps)[0],
                                  (x, weight, bias), grad_out)
            return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)),
                    None)
        grads = _Backward.apply(x, weight, bias, stats, grad_out, ctx.eps,
                                ctx.needs_input_grad[:3])
        return (*grads, None)


class _Backward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) from grad_out; differentiable (second-order MAML's
    inner steps), its own backward is not (a third derivative raises)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats, grad_out, eps, needs):
        grad_out = dense(grad_out, torch.channels_last)
        gx, gw, gb = (_empty(t, n) for t, n in zip((x, weight, bias), needs))
        _C.batch_norm_relu_pool_backward(*_code(x), ptr(x), ptr(weight), ptr(bias),
                                         ptr(stats[0]), ptr(stats[1]), eps, ptr(grad_out),
                                         ptr(gx), ptr(gw), ptr(gb))
        ctx.save_for_backward(x, weight, bias, stats, grad_out)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, gg, ggw, ggb):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than return a constant
            raise RuntimeError(f"{_OP}: its second derivative is not differentiable; "
                               "differentiate torch's batch_norm, relu and max_pool2d instead")
        x, weight, bias, stats, grad_out = ctx.saved_tensors
        gg = (torch.zeros_like(x) if gg is None
              else dense(gg, torch.channels_last))
        ggw = torch.zeros_like(weight) if ggw is None else dense(ggw)
        ggb = torch.zeros_like(bias) if ggb is None else dense(ggb)
        need_x, need_w, _, _, need_go = ctx.needs_input_grad[:5]
        gx, gw, ggo = _empty(x, need_x), _empty(weight, need_w), _empty(grad_out, need_go)
        _C.batch_norm_relu_pool_double_backward(
            *_code(x), ptr(x), ptr(weight), ptr(bias), ptr(stats[0]), ptr(stats[1]), ctx.eps,
            ptr(grad_out), ptr(gg), ptr(ggw), ptr(ggb), ptr(gx), ptr(gw), ptr(ggo))
        return gx, gw, None, None, ggo, None, None


def batch_norm_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``max_pool2d(relu(batch_norm(x, training=True)), 2)`` and the batch statistics.

    Args:
        x: ``[N, C, H, W]`` float32/float64 CPU tensor; channels_last memory is read in place
            (other layouts are copied to it).
        weight, bias: BatchNorm's affine parameters, ``[C]``.
        eps: added to the variance, as in ``nn.BatchNorm2d``.

    Returns:
        ``(out, mean, var)``: ``out [N, C, H // 2, W // 2]`` (channels_last), and the
        per-channel batch mean and biased variance ``[C]`` (not differentiable), from which
        callers update running statistics. Differentiable twice (``gradgradcheck``-clean);
        differentiating a second derivative raises.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
        >>> w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        >>> out, mean, var = batch_norm_relu_pool(x, w, b)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, w, b, True)), 2)
        >>> bool(torch.allclose(out, ref)), tuple(out.shape)
        (True, (8, 4, 3, 3))
    """
    x, weight, bias = autocast_float32(x, weight, bias)
    _check(x, weight, bias, eps)
    if recording() or functorch_active() or wrapped(x, weight, bias):  # no data for the kernel
        return reference.batch_norm_relu_pool(x, weight, bias, float(eps))
    x = dense(x, torch.channels_last)  # outside the Function: recorded
    return _BatchNormReluPool.apply(x, dense(weight), dense(bias), float(eps))


__all__ = ["batch_norm_relu_pool"]
