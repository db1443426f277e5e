"""``sgd_step`` / ``sgd_step_``: one fused SGD update over a whole list of tensors.

Kernels: ``csrc/{cpu,cuda}/sgd_step*`` (one parallel region on CPU, one multi-tensor launch
on CUDA). Each tensor's operands are described to the kernel as task slices: an operand is
*full* (same shape as the result), *shared* (the result without its leading task dim),
*scalar* (one element) or, for rates only, *per task* (``[T, 1, ..., 1]``). Any other
broadcast is materialised first. Call paths as in ``pairwise_distances``.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import _C
from ._kernels import (CPU_DTYPES, DTYPE_CODES, NUMPY_DTYPE_CODES, PLAIN_TYPES, apply_function,
                       batched, check_float_tensors, dense, forward_ad_active, functorch_active,
                       has_tangent, launch, needs_autograd, numpy_float, numpy_launch, ptr,
                       recording, shape_str, valid_float_tensors, wrapped)

_OP = "sgd_step"
_FULL, _SHARED, _SCALAR, _PER_TASK = range(4)


def _kind(shape, out_shape) -> Optional[int]:
    """How an operand of ``shape`` broadcasts to ``out_shape`` (None: needs materialising)."""
    padded = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    if padded == tuple(out_shape):
        return _FULL
    if all(s == 1 for s in padded):
        return _SCALAR
    if padded[0] == 1 and padded[1:] == tuple(out_shape[1:]):
        return _SHARED
    if padded[0] == out_shape[0] and all(s == 1 for s in padded[1:]):
        return _PER_TASK
    return None


class _Plan:
    """Kernel descriptors for one call, grouped by task count (normally one group)."""

    def __init__(self, params, grads, lrs, outs):
        self.outs = outs
        pending = []
        for i, (p, g, out) in enumerate(zip(params, grads, outs)):
            lr = lrs[i] if lrs is not None else None
            out_shape = out.shape
            ops, tasks = [], None
            for name, t in (("p", p), ("g", g), ("lr", lr)):
                kind = None if t is None else _kind(t.shape, out_shape)
                if t is not None and (kind is None or (kind == _SCALAR and name != "lr")
                                      or (kind == _PER_TASK and name != "lr")):
                    t, kind = _materialize(t, out_shape), _FULL
                elif t is not None:
                    t = _contiguous(t)
                if kind in (_SHARED, _PER_TASK):
                    tasks = out_shape[0]
                ops.append((t, kind))
            pending.append((out, ops, tasks))
        forced = [t for *_, t in pending if t is not None]
        common = max(set(forced), key=forced.count) if forced else 1
        self.flat: dict[int, list[int]] = defaultdict(list)
        self.keep = []  # materialised operands must live until the kernel has run
        for out, ops, tasks in pending:
            if tasks is not None and tasks != common:
                T = tasks
            elif common and math.prod(out.shape) % common == 0:
                T = common
            else:
                T = 1
            self.flat[T].extend(_descriptor(out, ops, T))
            self.keep.append(ops)


def _contiguous(t):
    return np.ascontiguousarray(t) if isinstance(t, np.ndarray) else dense(t)


def _materialize(t, shape):
    """A dense copy of ``t`` broadcast to ``shape``."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(np.broadcast_to(t, shape))
    return dense(t.expand(shape))


def _descriptor(out, ops, T) -> list[int]:
    M = math.prod(out.shape) // T if T else 0
    (p, pk), (g, gk), (lr, lk) = ops
    stride = {_FULL: M, _SHARED: 0, _SCALAR: 0, _PER_TASK: 1}
    return [ptr(out), ptr(p), ptr(g), ptr(lr),
            stride[pk] if p is not None else 0, stride[gk],
            stride[lk] if lr is not None else 0,
            0 if lr is None or lk in (_SCALAR, _PER_TASK) else 1, M]


def _run(plan: _Plan, dev, dtype_code: int, lr: float) -> None:
    for T, flat in plan.flat.items():
        if T:
            _C.sgd_step(*dev, dtype_code, T, lr, flat)


def _out_shapes(params, grads, lrs) -> list:
    return [_broadcast_shape([t.shape for t in (p, g, lrs[i] if lrs else None) if t is not None])
            for i, (p, g) in enumerate(zip(params, grads))]


def _kernel(params, grads, lrs, lr: float, outs=None) -> list[torch.Tensor]:
    """The fused step on torch tensors; params entries may be None (read as zero)."""
    if outs is None and lrs is None:
        g0 = grads[0]
        done = _plain_run(params, grads, lr, g0.dtype, g0.device, False)
        if done is not None:
            return done
    if outs is None:
        outs = [g.new_empty(s) for g, s in zip(grads, _out_shapes(params, grads, lrs))]
    plan = _Plan(params, grads, lrs, outs)
    _run(plan, launch(grads[0]), DTYPE_CODES[grads[0].dtype], lr)
    return outs


def _plain_run(params, grads, lr: float, dtype, device, grad_mode: bool):
    """The step in one pass over the list, for the layouts nearly every call has: each param
    (or None) either the grad's shape, or, in MAML's first inner step, the grad without its
    leading task dim T; all contiguous, of ``dtype`` on ``device``, and (in ``grad_mode``)
    none requiring grad. Returns None, having run nothing, whenever anything differs: the
    general path then plans (or explains) it."""
    p0, g0 = params[0], grads[0]
    shared0 = p0 is not None and p0.dim() + 1 == g0.dim()
    T = g0.shape[0] if shared0 else 1
    if T == 0:
        return None
    outs, desc = [], []
    for p, g in zip(params, grads):
        if not (type(g) in PLAIN_TYPES and g.dtype is dtype and g.device == device
                and g.layout is torch.strided and g.is_contiguous() and not g.is_neg()) \
                or grad_mode and g.requires_grad:
            return None
        if p is not None and not (type(p) in PLAIN_TYPES and p.dtype is dtype
                                  and p.device == device and p.layout is torch.strided
                                  and p.is_contiguous() and not p.is_neg()
                                  and not (grad_mode and p.requires_grad)):
            return None
        gs, n = g.shape, g.numel()
        if p is None or (ps := p.shape) == gs:
            if T != 1 and (not gs or gs[0] != T):
                return None
            m = n // T
            p_stride = m
        elif len(gs) == len(ps) + 1 and gs[0] == T and gs[1:] == ps:
            m, p_stride = n // T, 0
        else:
            return None
        out = torch.empty_like(g)
        outs.append(out)
        desc += (out.data_ptr(), 0 if p is None else p.data_ptr(), g.data_ptr(), 0, p_stride,
                 m, 0, 0, m)
    _C.sgd_step(*launch(g0), DTYPE_CODES[dtype], T, lr, desc)
    return outs


def _eager_plain(params, grads, lr):
    """The common eager call without autograd: a float rate and :func:`_plain_run`'s layouts.
    Returns None whenever anything differs; the general path then checks the inputs and
    explains any problem."""
    if (isinstance(lr, bool) or not isinstance(lr, (float, int))
            or not isinstance(grads, (list, tuple)) or not isinstance(params, (list, tuple))
            or not grads or len(params) != len(grads)):
        return None
    if recording() or functorch_active() or forward_ad_active():
        return None
    g0 = grads[0]
    if not isinstance(g0, torch.Tensor) or g0.dtype not in DTYPE_CODES:
        return None
    if not g0.is_cuda and (g0.device.type != "cpu" or g0.dtype not in CPU_DTYPES) \
            or not isinstance(params[0], torch.Tensor):
        return None
    return _plain_run(params, grads, float(lr), g0.dtype, g0.device, torch.is_grad_enabled())


class _SgdStep(torch.autograd.Function):
    """Inputs: (n, lr_float, has_lrs, *params, *grads[, *lrs])."""

    @staticmethod
    def forward(n, lr, has_lrs, *tensors):
        params, grads, lrs = _unpack(n, has_lrs, tensors)
        return tuple(_kernel(params, grads, lrs, lr))

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, lr, has_lrs, *tensors = inputs
        params, grads, lrs = _unpack(n, has_lrs, tensors)
        ctx.n, ctx.lr, ctx.has_lrs = n, lr, has_lrs
        ctx.param_shapes = [None if p is None else p.shape for p in params]
        ctx.grad_shapes = [g.shape for g in grads]
        if has_lrs:  # with a float rate the backward needs no tensor of the forward
            ctx.save_for_backward(*grads, *lrs)
            ctx.save_for_forward(*grads, *lrs)

    @staticmethod
    def jvp(ctx, _n, _lr, _has_lrs, *tangents):
        """Forward-mode AD: d(p - lr g) = dp - lr dg - dlr g, in the output's shape."""
        n = ctx.n
        dps, dgs, dlrs = _unpack(n, ctx.has_lrs, tangents)
        saved = ctx.saved_tensors  # grads and rates, saved only with tensor rates
        grads, lrs = (saved[:n], saved[n:]) if ctx.has_lrs else (None, None)
        outs = []
        for i in range(n):
            lr = ctx.lr if lrs is None else lrs[i]
            terms = [dps[i]]
            if dgs[i] is not None:
                terms.append(-lr * dgs[i])
            if dlrs is not None and dlrs[i] is not None:
                terms.append(-dlrs[i] * grads[i])
            terms = [t for t in terms if t is not None]
            shapes = [s for s in (ctx.param_shapes[i], ctx.grad_shapes[i],
                                  None if lrs is None else lrs[i].shape) if s is not None]
            outs.append(sum(terms[1:], terms[0]).expand(_broadcast_shape(shapes)).clone()
                        if terms else None)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gos):
        n = ctx.n
        saved = ctx.saved_tensors  # only with tensor rates
        grads, lrs = (saved[:n], saved[n:]) if ctx.has_lrs else (None, None)
        need = ctx.needs_input_grad[3:]
        dps = [go.sum_to_size(s) if s is not None and need[i] else None
               for i, (go, s) in enumerate(zip(gos, ctx.param_shapes))]
        dgs = [None] * n
        if any(need[n:2 * n]):
            if batched(*gos):  # autograd's own vmap: torch's ops
                steps = [-(ctx.lr if lrs is None else lrs[i]) * go for i, go in enumerate(gos)]
            elif functorch_active() or torch.is_grad_enabled():  # a graph of the backward
                steps = sgd_step([None] * n, list(gos), list(lrs) if lrs else ctx.lr)
            else:
                steps = _kernel([None] * n, [dense(go) for go in gos], lrs, ctx.lr)
            dgs = [d.sum_to_size(shape) if need[n + i] else None
                   for i, (d, shape) in enumerate(zip(steps, ctx.grad_shapes))]
        dlrs = []
        if lrs is not None:
            dlrs = [-(go * g).sum_to_size(a.shape) if need[2 * n + i] else None
                    for i, (go, g, a) in enumerate(zip(gos, grads, lrs))]
        return None, None, None, *dps, *dgs, *dlrs

    @staticmethod
    def vmap(info, in_dims, n, lr, has_lrs, *tensors):
        dims = in_dims[3:]
        params, grads, lrs = _unpack(n, has_lrs, tensors)
        pd, gd, ld = _unpack(n, has_lrs, dims)
        moved = []
        for i in range(n):
            group = [(params[i], pd[i]), (grads[i], gd[i])]
            if lrs is not None:
                group.append((lrs[i], ld[i]))
            rank = max(t.dim() - (d is not None) for t, d in group if t is not None)
            moved.append([_batched_left_pad(t, d, rank) for t, d in group])
        params = [m[0] for m in moved]
        grads = [m[1] for m in moved]
        lrs = [m[2] for m in moved] if lrs is not None else None
        outs = _SgdStep.apply(n, lr, has_lrs, *params, *grads, *(lrs or ()))
        batched = [any(d is not None for d in ds) for ds in zip(pd, gd, ld or [None] * n)]
        return outs, tuple(0 if b else None for b in batched)


def _batched_left_pad(t, d, rank):
    """Moves a vmapped dim to the front and pads the logical shape to ``rank`` dims, so that
    broadcasting against unbatched operands lines up (from the right) as it would unbatched."""
    if t is None or d is None:
        return t
    t = t.movedim(d, 0)
    return t.reshape(t.shape[0], *(1,) * (rank - (t.dim() - 1)), *t.shape[1:])


def _unpack(n, has_lrs, seq):
    params, grads = list(seq[:n]), list(seq[n:2 * n])
    return params, grads, (list(seq[2 * n:3 * n]) if has_lrs else None)


# ---- registered op, used under torch.compile -------------------------------------------
# (typing.List in the schema, not list[...]: torch < 2.6 takes only the former)

@torch.library.custom_op("pymeta::sgd_step", mutates_args=())
def _sgd_step_op(params: List[torch.Tensor], grads: List[torch.Tensor],
                 lrs: List[torch.Tensor], lr: float) -> List[torch.Tensor]:
    _check_op_inputs(params, grads, lrs)
    return _kernel(params, grads, lrs or None, lr)


@_sgd_step_op.register_fake
def _(params, grads, lrs, lr):
    lrs = lrs or [None] * len(params)
    return [g.new_empty(torch.broadcast_shapes(*(t.shape for t in (p, g, a) if t is not None)))
            for p, g, a in zip(params, grads, lrs)]  # symbolic shapes: keep torch's version


def _op_setup(ctx, inputs, output):
    params, grads, lrs, lr = inputs
    ctx.param_shapes = [p.shape for p in params]
    ctx.lr = lr
    ctx.save_for_backward(*grads, *lrs)


def _op_backward(ctx, gos):
    n = len(gos)
    grads, lrs = ctx.saved_tensors[:n], ctx.saved_tensors[n:] or [ctx.lr] * n
    dps = [go.sum_to_size(s) for go, s in zip(gos, ctx.param_shapes)]
    dgs = [(-a * go).sum_to_size(g.shape) for go, g, a in zip(gos, grads, lrs)]
    dlrs = ([-(go * g).sum_to_size(a.shape) for go, g, a in zip(gos, grads, lrs)]
            if ctx.saved_tensors[n:] else [])
    return dps, dgs, dlrs, None


_sgd_step_op.register_autograd(_op_backward, setup_context=_op_setup)


def _check_op_inputs(params, grads, lrs) -> None:
    """The public checks, for the registered ops: a traced graph may replay any inputs."""
    if len(grads) != len(params) or lrs and len(lrs) != len(params):
        raise ValueError(f"{_OP}: got {len(params)} params, {len(grads)} grads and "
                         f"{len(lrs)} rates")
    if params:
        _check_tensors(params, grads, lrs or None)


# ---- public API -------------------------------------------------------------------------

def _check_list_types(params, grads) -> None:
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"{_OP}: params and grads must be lists of tensors, got "
                        f"{type(params).__name__} and {type(grads).__name__}")


def _check_lists(params, grads, lr):
    _check_list_types(params, grads)
    if len(params) != len(grads):
        raise ValueError(f"{_OP}: got {len(params)} params but {len(grads)} grads")
    if isinstance(lr, (list, tuple)):
        if len(lr) != len(params):
            raise ValueError(f"{_OP}: got {len(lr)} learning rates for {len(params)} params")
        for i, a in enumerate(lr):
            if not isinstance(a, (torch.Tensor, np.ndarray)):
                raise TypeError(f"{_OP}: lr[{i}] must be a tensor (a list of rates holds one "
                                f"per param), got {type(a).__name__}")
        return list(lr)
    if isinstance(lr, (torch.Tensor, np.ndarray)):  # one rate for every param (autograd sums)
        return [lr] * len(params)
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{_OP}: lr must be a float, a tensor or a list of tensors, got "
                        f"{type(lr).__name__}")
    return None


def _broadcast_shape(shapes):
    """torch.broadcast_shapes without its (large) per-call overhead; None if incompatible."""
    out = tuple(shapes[0])
    for s in map(tuple, shapes[1:]):  # common cases: equal shapes, or one a suffix of the other
        if s == out or (len(s) < len(out) and out[len(out) - len(s):] == s):
            continue
        if len(s) > len(out) and s[len(s) - len(out):] == out:
            out = s
            continue
        break
    else:
        return out
    rank = max(len(s) for s in shapes)
    out = []
    for dims in zip(*((1,) * (rank - len(s)) + tuple(s) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _check_shapes(i, p, g, lr):
    named = [(n, t.shape) for n, t in (("param", p), ("grad", g), ("lr", lr)) if t is not None]
    shape = _broadcast_shape([s for _, s in named])
    if shape is None:
        raise ValueError(f"{_OP}: tensor {i}: shapes do not broadcast: " + ", ".join(
            f"{n} {shape_str(s)}" for n, s in named))
    return shape


def _common_case(params, grads, lrs) -> bool:
    """A cheap test that :func:`_check_tensors` would pass: tensors of one supported dtype
    and device, each param the grad's shape or the grad without its leading dim, each rate
    0-d or the param's shape."""
    if not valid_float_tensors(*grads, *(p for p in params if p is not None), *(lrs or ())):
        return False
    for i, (p, g) in enumerate(zip(params, grads)):
        gs = g.shape
        if p is not None and p.shape != gs and gs[1:] != p.shape:
            return False
        if lrs is not None and lrs[i].dim() and lrs[i].shape != (gs if p is None else p.shape):
            return False
    return True


def _check_tensors(params, grads, lrs) -> list:
    """Checks types, dtypes, devices and shapes; returns the result shapes."""
    first = check_float_tensors(_OP, **{"grads[0]": grads[0]})
    dtype, device = first.dtype, first.device
    shapes = []
    for i, (p, g) in enumerate(zip(params, grads)):
        a = lrs[i] if lrs is not None else None
        for name, t in (("params", p), ("grads", g), ("lr", a)):
            if (t is not None or name == "grads") and not (
                    isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == device
                    and t.layout is torch.strided):
                check_float_tensors(_OP, **{"grads[0]": first, f"{name}[{i}]": t})
        shapes.append(_check_shapes(i, p, g, a))
    return shapes


def _numpy(params, grads, lr, inplace: bool):
    lrs = _check_lists(params, grads, lr)
    if not inplace and any(p is None for p in params):  # read as zero, as for tensors
        params = [np.zeros(np.shape(g), getattr(g, "dtype", np.float64)) if p is None else p
                  for p, g in zip(params, grads)]
    arrays = [*params, *grads, *(lrs or ())]
    if not all(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError(f"{_OP}: mix of numpy arrays and other types; pass all numpy or all torch")
    dtype = numpy_float(_OP, "params[0]", params[0]).dtype if params else np.float64
    conv = [numpy_float(_OP, "arrays", a, dtype) for a in arrays]
    n = len(params)
    ps, gs = conv[:n], conv[n:2 * n]
    ls = conv[2 * n:] if lrs is not None else None
    shapes = [_check_shapes(i, ps[i], gs[i], ls[i] if ls else None) for i in range(n)]
    if inplace:
        _check_inplace_shapes(params, shapes)
        _check_no_overlap(params, [*grads, *(lrs or ())])
        for i, p in enumerate(params):  # before any is written: all or none are updated
            if not p.flags.writeable:
                raise ValueError(f"{_OP}_: params[{i}] is a read-only array")
            _check_not_expanded(i, p.shape, p.strides)
    outs = [np.empty(s, dtype) for s in shapes]
    _run(_Plan(ps, gs, ls, outs), numpy_launch(), NUMPY_DTYPE_CODES[dtype],
         0.0 if lrs is not None else float(lr))
    if inplace:
        for p, o in zip(params, outs):
            p[...] = o
        return list(params)
    return outs


def _check_no_overlap(params, reads) -> None:
    """An in-place step must not write memory that another operand reads or writes: the
    result would depend on the order the kernel visits elements (and on the thread count).
    Address ranges are compared (as numpy's ``may_share_memory``), sorted, in one sweep;
    pairs whose ranges meet are then tested element by element where that is possible."""
    operands = [*params, *reads]
    tensors = [(i, t) for i, t in enumerate(operands) if t is not None]
    if isinstance(params[0], np.ndarray):
        pairs = ((i, j) for i, a in tensors[:len(params)] for j, b in tensors
                 if j != i and np.may_share_memory(a, b))
    else:
        pairs = _overlapping_pairs([(*_byte_range(t), i) for i, t in tensors if t.numel()])
    for i, j in pairs:
        if min(i, j) < len(params) and _share_elements(operands[i], operands[j]):
            i, j = (i, j) if i < len(params) else (j, i)
            what = f"params[{j}]" if j < len(params) else "a grad or rate"
            raise ValueError(f"{_OP}_: params[{i}] shares memory with {what}; an in-place "
                             "step needs params that overlap nothing else (clone one)")


def _share_elements(a, b) -> bool:
    """Whether two operands whose address ranges meet share an element: interleaved views
    (two columns of one matrix) do not. numpy's exact test; CPU tensors are viewed as arrays,
    other tensors are assumed to share (the range test stands)."""
    if isinstance(a, torch.Tensor):
        if not (a.is_cpu and b.is_cpu) or a.is_neg() or b.is_neg():
            return True
        a, b = a.detach().numpy(), b.detach().numpy()
    return np.shares_memory(a, b)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    reach = t.numel() if t.is_contiguous() else \
        sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return start, start + reach * t.element_size()


def _overlapping_pairs(spans):
    """Index pairs of the (start, end, index) spans whose address ranges intersect (two
    storages may share memory too: numpy views, from_blob)."""
    active = []
    for lo, hi, i in sorted(spans):
        active = [(h, j) for h, j in active if h > lo]
        yield from ((j, i) for _, j in active)
        active.append((hi, i))


def _check_not_expanded(i, shape, strides) -> None:
    if any(st == 0 and n > 1 for st, n in zip(strides, shape)):
        raise ValueError(f"{_OP}_: params[{i}] is an expanded view: several of its elements "
                         f"share memory, so they cannot take different updates")


def _check_inplace_shapes(params, shapes):
    for i, (p, s) in enumerate(zip(params, shapes)):
        if tuple(p.shape) != tuple(s):
            raise ValueError(f"{_OP}_: params[{i}] {shape_str(p.shape)} cannot hold the "
                             f"update of shape {shape_str(s)}; use sgd_step instead")


def _any_numpy(params, grads, lr) -> bool:
    rates = lr if isinstance(lr, (list, tuple)) else (lr,)
    return any(isinstance(a, np.ndarray) for a in (*params, *grads, *rates))


def sgd_step(params: Sequence, grads: Sequence, lr):
    """One SGD step over a whole list of tensors: ``[p - lr * g for each tensor]``, fused.

    Args:
        params: tensors ``[...]`` (shared by all tasks) or ``[T, ...]`` (one slice per task).
            Entries may be ``None``, read as zero.
        grads: tensors broadcastable against ``params``, typically ``[T, ...]``.
        lr: a float; one tensor broadcastable to every parameter (a learned global rate,
            0-d); or a list with one tensor per parameter broadcastable to it: 0-d
            (per-layer rates, MAML++), ``[...]`` (per-parameter, Meta-SGD) or ``[T, ...]``.

    Returns:
        A list of new tensors (numpy arrays for numpy input). Differentiable, to any order,
        in params, grads and tensor rates.

    Example:
        >>> import torch, pymeta.ops as ops
        >>> w = torch.randn(64, 32, requires_grad=True)      # shared meta-parameters
        >>> g = torch.randn(8, 64, 32)                        # per-task gradients
        >>> fast = ops.sgd_step([w], [g], 0.4)                # [8, 64, 32] fast weights
        >>> rate = torch.full((64, 32), 0.1, requires_grad=True)
        >>> fast = ops.sgd_step([w], [g], [rate])             # Meta-SGD
    """
    outs = _eager_plain(params, grads, lr)
    if outs is not None:
        return outs
    _check_list_types(params, grads)
    if _any_numpy(params, grads, lr):
        return _numpy(params, grads, lr, inplace=False)
    lrs = _check_lists(params, grads, lr)
    if not grads:
        return []
    foreign = False
    if not _common_case(params, grads, lrs):  # plain tensors of one dtype pass it
        _check_tensors(params, grads, lrs)  # the slow path names the problem
        foreign = wrapped(*params, *grads, *(lrs or ()))
    lr_float = 0.0 if lrs is not None else float(lr)
    if foreign or recording():
        if any(p is None for p in params):
            params = [torch.zeros_like(g) if p is None else p for p, g in zip(params, grads)]
        return torch.ops.pymeta.sgd_step(list(params), list(grads), lrs or [], lr_float)
    if functorch_active() or needs_autograd(*params, *grads, *(lrs or ())):
        return list(apply_function(_SgdStep, len(params), lr_float, lrs is not None, *params,
                                   *grads, *(lrs or ())))
    return _kernel(params, grads, lrs, lr_float)


def sgd_step_(params: Sequence, grads: Sequence, lr):
    """In-place :func:`sgd_step`: ``p -= lr * g`` for each tensor; returns ``params``.

    For non-differentiable use (first-order inner loops, Reptile, fine-tuning): it refuses
    tensors that require grad while grad mode is on. Each ``p`` must already have the
    update's shape (task-stacked ``[T, ...]`` for per-task gradients).

    Example:
        >>> import torch, pymeta.ops as ops
        >>> params = [torch.zeros(4, 3)]
        >>> with torch.no_grad():
        ...     _ = ops.sgd_step_(params, [torch.ones(4, 3)], 0.5)
        >>> params[0][0, 0].item()
        -0.5
    """
    _check_list_types(params, grads)
    if _any_numpy(params, grads, lr):
        return _numpy(params, grads, lr, inplace=True)
    lrs = _check_lists(params, grads, lr)
    if any(p is None for p in params):
        raise ValueError(f"{_OP}_: params must all be tensors")
    if not grads:
        return params
    lr_float = 0.0 if lrs is not None else float(lr)
    _check_inplace_shapes(params, _check_tensors(params, grads, lrs))
    if functorch_active():
        raise RuntimeError(f"{_OP}_: in-place updates are not supported under torch.func "
                           "transforms; use the differentiable sgd_step")
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{_OP}_: in-place update of tensors that require grad; call it "
                           "under torch.no_grad(), or use the differentiable sgd_step")
    if forward_ad_active() and has_tangent(*params, *grads, *(lrs or ())):
        raise RuntimeError(f"{_OP}_: in-place update of dual tensors (forward-mode AD); use "
                           "the differentiable sgd_step")
    if recording() or wrapped(*params, *grads, *(lrs or ())):  # the functional op, copy_
        for p, out in zip(params, sgd_step(params, grads, lrs if lrs is not None else lr)):
            p.copy_(out)
        return params
    _check_no_overlap(params, [*grads, *(lrs or ())])
    for i, p in enumerate(params):  # before any is written: all or none are updated
        _check_not_expanded(i, p.shape, p.stride())
        if p.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{_OP}_: params[{i}] is an inference tensor; update it inside "
                               f"torch.inference_mode(), as torch requires")
    outs = [p if p.is_contiguous() and not p.is_neg()
            else torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    _kernel(params, grads, lrs, lr_float, outs)
    for p, o in zip(params, outs):
        if o is not p:
            p.copy_(o)
        torch.autograd.graph.increment_version(p)
    return params
