"""``batch_norm_relu_pool``: training-mode BatchNorm, ReLU and 2x2 max-pooling in one pass.

Kernel: ``csrc/cpu/batch_norm_relu_pool_cpu.cpp`` (CPU only). It is conv4's block tail
(conv - BatchNorm - ReLU - max-pool) after the convolution. Forward keeps only its input:
backward recomputes each window's normalised values, so the normalised map, the ReLU output
and the max-pool indices (2.4x the input's size) are never stored, and the three backward
passes become two. Its backward is not itself differentiable (``create_graph=True`` raises):
use it where the graph is differentiated once, such as the query pass of MAML, whose gradient
flows back through the inner loop's second-order graph without being differentiated again.
"""
from __future__ import annotations

import torch

from .. import _C
from ._kernels import DTYPE_CODES, check_float_tensors, launch, ptr, shape_str

_OP = "batch_norm_relu_pool"


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    check_float_tensors(_OP, x=x, weight=weight, bias=bias)
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


class _BatchNormReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = weight.contiguous(), bias.contiguous()
        N, C, H, W = x.shape
        out = torch.empty(N, C, H // 2, W // 2, dtype=x.dtype, memory_format=torch.channels_last)
        stats = torch.empty(2, C, dtype=torch.float64)
        _C.batch_norm_relu_pool_forward(*launch(x), DTYPE_CODES[x.dtype], N, H, W, C, ptr(x),
                                        ptr(weight), ptr(bias), eps, ptr(out), ptr(stats[0]),
                                        ptr(stats[1]))
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps = eps
        mean, var = stats.to(x.dtype)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than return a constant
            raise RuntimeError(f"{_OP}: its backward is not differentiable; differentiate "
                               "torch's batch_norm, relu and max_pool2d instead")
        x, weight, bias, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        N, C, H, W = x.shape
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty_like(bias) if need_b else None
        _C.batch_norm_relu_pool_backward(*launch(x), DTYPE_CODES[x.dtype], N, H, W, C, ptr(x),
                                         ptr(weight), ptr(bias), ptr(stats[0]), ptr(stats[1]),
                                         ctx.eps, ptr(grad_out), ptr(gx), ptr(gw), ptr(gb))
        return gx, gw, gb, None


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
        callers update running statistics. Gradients flow to ``x``, ``weight`` and ``bias``
        once: a backward with ``create_graph=True`` raises.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
        >>> w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        >>> out, mean, var = batch_norm_relu_pool(x, w, b)
        >>> ref = F.max_pool2d(F.relu(F.batch_norm(x, None, None, w, b, True)), 2)
        >>> bool(torch.allclose(out, ref)), tuple(out.shape)
        (True, (8, 4, 3, 3))
    """
    _check(x, weight, bias)
    return _BatchNormReluPool.apply(x, weight, bias, float(eps))


__all__ = ["batch_norm_relu_pool"]
