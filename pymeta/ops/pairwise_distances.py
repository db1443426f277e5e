"""``pairwise_distances``: batched distances between query rows and support rows.

Three call paths share the kernels in ``csrc/{cpu,cuda}/pairwise_distances*``: a direct
kernel call when no gradient is needed (the light eager path), an ``autograd.Function``
with a vmap rule for autograd and ``torch.func``, and the registered op
``pymeta::pairwise_distances`` (with a fake implementation) for ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import _C
from . import reference
from ._kernels import (DTYPE_CODES, NUMPY_DTYPE_CODES, apply_function, autocast_float32,
                       batch_front, batched, check_float_tensors, dense, forward_ad_active,
                       functorch_active, launch, needs_autograd, numpy_float, numpy_launch, ptr,
                       recording, reference_vjp, shape_str, valid_float_tensors, wrapped)

METRICS = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2, "dot": 3}
_READS_OUTPUT = ("euclidean", "cosine")  # metrics whose backward reads the distances
_OP = "pairwise_distances"


def _check_shapes(x, y, metric: str) -> int:
    if not isinstance(metric, str):
        raise TypeError(f"{_OP}: metric must be a string, got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"{_OP}: unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"{_OP}: x and y need shape [..., rows, features], got x "
                         f"{shape_str(x.shape)} and y {shape_str(y.shape)}")
    if tuple(x.shape[:-2]) != tuple(y.shape[:-2]):
        raise ValueError(f"{_OP}: leading (task) dims differ: x {shape_str(x.shape)} vs y "
                         f"{shape_str(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{_OP}: feature dims differ: x has {x.shape[-1]}, y has {y.shape[-1]}")
    return METRICS[metric]


def _forward_kernel(x: torch.Tensor, y: torch.Tensor, code: int) -> torch.Tensor:
    *lead, Q, D = x.shape
    N = y.shape[-2]
    x, y = x.contiguous(), y.contiguous()
    if x.is_neg() or y.is_neg():  # dense() inlined: the hot path of small episodes
        x, y = x.resolve_neg(), y.resolve_neg()
    out = x.new_empty(*lead, Q, N)
    if out.numel():
        _C.pairwise_distances_forward(*launch(x), DTYPE_CODES[x.dtype], code, math.prod(lead), Q,
                                      N, D, x.data_ptr(), y.data_ptr(), out.data_ptr())
    return out


def _backward_kernel(g, x, y, out, code: int, need_x: bool = True, need_y: bool = True):
    *lead, Q, D = x.shape
    N = y.shape[-2]
    x, y, g = dense(x), dense(y), dense(g)
    out = None if out is None else dense(out)  # None: the metric does not read it
    if Q * N == 0:  # no distances: the gradients are exactly zero
        return (torch.zeros_like(x) if need_x else None), (torch.zeros_like(y) if need_y else None)
    gx = torch.empty_like(x) if need_x else None
    gy = torch.empty_like(y) if need_y else None
    if (need_x or need_y) and D:
        _C.pairwise_distances_backward(*launch(x), DTYPE_CODES[x.dtype], code, math.prod(lead),
                                       Q, N, D, g.data_ptr(), x.data_ptr(), y.data_ptr(),
                                       ptr(out), ptr(gx), ptr(gy))
    return gx, gy


class _PairwiseDistances(torch.autograd.Function):
    @staticmethod
    def forward(x, y, metric):
        return _forward_kernel(x, y, METRICS[metric])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, metric = inputs
        # unsaved where unread, so an in-place edit of the distances breaks no backward
        ctx.save_for_backward(x, y, output if metric in _READS_OUTPUT else None)
        ctx.save_for_forward(x, y)
        ctx.metric = metric

    @staticmethod
    def jvp(ctx, dx, dy, _):
        """Forward-mode AD through the torch reference (off the hot path, like second order)."""
        return _reference_jvp(lambda a, b: reference.pairwise_distances(a, b, ctx.metric),
                              ctx.saved_tensors[:2], (dx, dy))

    @staticmethod
    def backward(ctx, grad):
        x, y, out = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        if batched(grad):
            gx, gy = reference_vjp(lambda a, b: reference.pairwise_distances(a, b, ctx.metric),
                                   (x, y), grad)
            return gx if need_x else None, gy if need_y else None, None
        if functorch_active() or torch.is_grad_enabled():  # a graph of the backward is built
            gx, gy = apply_function(_PairwiseDistancesBackward, grad, x, y, out, ctx.metric,
                                    need_x, need_y)
        else:
            gx, gy = _backward_kernel(grad, x, y, out, METRICS[ctx.metric], need_x, need_y)
        return gx, gy, None

    @staticmethod
    def vmap(info, in_dims, x, y, metric):
        x, y = batch_front(info.batch_size, in_dims[:2], x, y)
        return _PairwiseDistances.apply(x, y, metric), 0


class _PairwiseDistancesBackward(torch.autograd.Function):
    """The analytic backward kernel as a differentiable function (for second order)."""

    @staticmethod
    def forward(grad, x, y, out, metric, need_x, need_y):
        return _backward_kernel(grad, x, y, out, METRICS[metric], need_x, need_y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, y, _, metric = inputs[:5]  # the registered op passes no need_x, need_y
        ctx.save_for_backward(grad, x, y)
        ctx.save_for_forward(grad, x, y)
        ctx.metric = metric
        ctx.need = tuple(inputs[5:7]) or (True, True)

    @staticmethod
    def jvp(ctx, dgrad, dx, dy, *_):
        """Forward-mode AD of the backward (forward-over-reverse, e.g. torch.func.hessian)
        through the torch reference."""
        dgs = _reference_jvp(
            lambda g, a, b: reference.pairwise_distances_backward(g, a, b, ctx.metric),
            ctx.saved_tensors[:3], (dgrad, dx, dy))
        return tuple(d if need else None for d, need in zip(dgs, ctx.need))

    @staticmethod
    def backward(ctx, ggx, ggy):
        grad, x, y = ctx.saved_tensors
        dg, dx, dy = _double_backward(grad, x, y, ctx.metric, ggx, ggy)
        return dg, dx, dy, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad, x, y, out, metric, need_x, need_y):
        grad, x, y, out = batch_front(info.batch_size, in_dims[:4], grad, x, y, out)
        gx, gy = _PairwiseDistancesBackward.apply(grad, x, y, out, metric, need_x, need_y)
        return (gx, gy), (None if gx is None else 0, None if gy is None else 0)


def _reference_jvp(fn, primals, tangents):
    """Tangent of ``fn`` (torch ops only) at ``primals``: torch.func.jvp, or inside an open
    torch.autograd.forward_ad level (which cannot nest) the double-vjp identity: the vjp of
    ``u -> J^T u`` with cotangent ``v`` is ``J v``. A None tangent is zero."""
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    # torch.func.jvp writes tangents into its primals: an expanded one (the gradient of a
    # .sum(), in hessian) would be written through stride 0
    primals = tuple(p.contiguous() for p in primals)
    if functorch_active() or not forward_ad_active():
        return torch.func.jvp(fn, primals, tangents)[1]
    with torch.enable_grad():
        xs = [p.detach().requires_grad_() for p in primals]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        vjps = torch.autograd.grad(outs, xs, us, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(vjps, tangents) if g is not None]
        jvps = torch.autograd.grad([g for g, _ in pairs], us, [t for _, t in pairs],
                                   allow_unused=True)
    jvps = tuple(torch.zeros_like(o) if j is None else j.detach() for j, o in zip(jvps, outs))
    return jvps if len(jvps) > 1 else jvps[0]


def _double_backward(grad, x, y, metric, ggx, ggy):
    """VJP of the backward through the torch reference (second order is off the hot path)."""
    ggx = torch.zeros_like(x) if ggx is None else ggx
    ggy = torch.zeros_like(y) if ggy is None else ggy
    _, vjp = torch.func.vjp(
        lambda g, a, b: reference.pairwise_distances_backward(g, a, b, metric), grad, x, y)
    return vjp((ggx, ggy))


# ---- registered ops, used under torch.compile ------------------------------------------

@torch.library.custom_op("pymeta::pairwise_distances", mutates_args=())
def _pairwise_distances_op(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    check_float_tensors(_OP, numpy=False, x=x, y=y)  # a traced graph may replay any inputs
    return _forward_kernel(x, y, _check_shapes(x, y, metric))


@_pairwise_distances_op.register_fake
def _(x, y, metric):
    return x.new_empty(*x.shape[:-1], y.shape[-2])


@torch.library.custom_op("pymeta::pairwise_distances_backward", mutates_args=())
def _pairwise_distances_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                    out: Optional[torch.Tensor], metric: str
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    code = _check_shapes(x, y, metric)
    if out is None and metric in _READS_OUTPUT:
        raise ValueError(f"{_OP} backward: the {metric} metric needs the distances")
    given = {name: t for name, t in (("grad", grad), ("out", out)) if t is not None}
    check_float_tensors(_OP, numpy=False, x=x, y=y, **given)
    expected = (*x.shape[:-1], y.shape[-2])
    for name, t in given.items():
        if tuple(t.shape) != expected:
            raise ValueError(f"{_OP} backward: {name} has shape {shape_str(t.shape)}, "
                             f"expected {shape_str(expected)}")
    return _backward_kernel(grad, x, y, out, code)


@_pairwise_distances_backward_op.register_fake
def _(grad, x, y, out, metric):
    return torch.empty_like(x), torch.empty_like(y)


def _op_backward(ctx, grad):
    x, y, out = ctx.saved_tensors
    gx, gy = torch.ops.pymeta.pairwise_distances_backward(grad, x, y, out, ctx.metric)
    return gx, gy, None


def _op_double_backward(ctx, ggx, ggy):
    grad, x, y = ctx.saved_tensors
    return *_double_backward(grad, x, y, ctx.metric, ggx, ggy), None, None


# The Functions' setup_context also serve the registered ops (same leading inputs).
_pairwise_distances_op.register_autograd(_op_backward,
                                         setup_context=_PairwiseDistances.setup_context)
_pairwise_distances_backward_op.register_autograd(
    _op_double_backward, setup_context=_PairwiseDistancesBackward.setup_context)


# ---- public API -------------------------------------------------------------------------

def _numpy(x, y, metric: str) -> np.ndarray:
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        raise TypeError(f"{_OP}: x and y must both be numpy arrays or both torch tensors")
    x = numpy_float(_OP, "x", x)
    y = numpy_float(_OP, "y", y, x.dtype)
    code = _check_shapes(x, y, metric)
    *lead, Q, D = x.shape
    N = y.shape[-2]
    out = np.empty((*lead, Q, N), x.dtype)
    if out.size:
        _C.pairwise_distances_forward(*numpy_launch(), NUMPY_DTYPE_CODES[x.dtype], code,
                                      math.prod(lead), Q, N, D, ptr(x), ptr(y), ptr(out))
    return out


def pairwise_distances(x, y, metric: str = "sqeuclidean"):
    """Distances between every row of ``x`` and every row of ``y``, task by task.

    Args:
        x: queries ``[..., Q, D]`` (torch tensor or numpy array).
        y: support rows or prototypes ``[..., N, D]``, with the same leading (task) dims.
        metric: ``"sqeuclidean"``, ``"euclidean"``, ``"cosine"`` (1 - cosine similarity,
            norms clamped at 1e-8 like ``F.cosine_similarity``) or ``"dot"`` (negative inner
            product). Smaller always means closer.

    Returns:
        ``[..., Q, N]``, of the input's type. Differentiable (to any order) in ``x`` and ``y``.

    Example:
        >>> import torch, pymeta.ops as ops
        >>> x, y = torch.randn(32, 75, 64), torch.randn(32, 5, 64)
        >>> logits = -ops.pairwise_distances(x, y)          # [32, 75, 5]
        >>> import numpy as np
        >>> ops.pairwise_distances(np.ones((3, 2)), np.zeros((4, 2))).shape
        (3, 4)
    """
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return _numpy(x, y, metric)
    foreign = False
    if not valid_float_tensors(x, y):  # the slow path: plain tensors of one dtype pass above
        x, y = autocast_float32(x, y)
        check_float_tensors(_OP, x=x, y=y)
        foreign = wrapped(x, y)
    code = _check_shapes(x, y, metric)
    if foreign or recording():
        return torch.ops.pymeta.pairwise_distances(x, y, metric)
    if functorch_active() or needs_autograd(x, y):
        return apply_function(_PairwiseDistances, x, y, metric)
    return _forward_kernel(x, y, code)
