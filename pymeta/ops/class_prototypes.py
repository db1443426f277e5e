"""``class_prototypes``: per-class mean embeddings for a batch of tasks.

Kernels: ``csrc/{cpu,cuda}/class_prototypes*``. Call paths as in ``pairwise_distances``:
direct kernel, ``autograd.Function`` with a vmap rule, and the registered op
``pymeta::class_prototypes`` for ``torch.compile`` (which never validates labels).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _C
from . import reference
from ._kernels import (DTYPE_CODES, NUMPY_DTYPE_CODES, PLAIN_TYPES, apply_function,
                       autocast_float32, batch_front, batched, check_float_tensors, dense,
                       functorch_active, launch, needs_autograd, numpy_float, numpy_launch, ptr,
                       recording, reference_vjp, shape_str, valid_float_tensors, wrapped)

_OP = "class_prototypes"
_OUT_OF_RANGE, _EMPTY_CLASS = 1, 2
_MAX_CLASSES = 2**31 - 1


def _check_shapes(z, labels, num_classes) -> None:
    # A SymInt (a traced dynamic size) is checked by the registered op when the graph runs.
    if not isinstance(num_classes, torch.SymInt):
        _check_num_classes(num_classes)
    if z.ndim < 2:
        raise ValueError(f"{_OP}: z needs shape [..., samples, features], got {shape_str(z.shape)}")
    if tuple(labels.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"{_OP}: labels must have shape {shape_str(z.shape[:-1])} (z without "
                         f"its feature dim), got {shape_str(labels.shape)}")


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"{_OP}: num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 0:
        raise ValueError(f"{_OP}: num_classes must be >= 0, got {num_classes}")
    if num_classes > _MAX_CLASSES:
        raise ValueError(f"{_OP}: num_classes {num_classes} is too large (at most 2**31 - 1)")


def _raise_label_error(status: int, task: int, index: int, value: int, lead, num_classes: int,
                       unsigned64: bool = False):
    if unsigned64 and value < 0:  # a uint64 label >= 2**63, wrapped by the int64 conversion
        value += 2**64
    index_of_task = tuple(int(i) for i in np.unravel_index(task, lead)) if lead else ()
    where = f"task {index_of_task[0] if len(lead) == 1 else index_of_task}" if lead else "the task"
    if status == _OUT_OF_RANGE:
        raise ValueError(f"{_OP}: label {value} at sample {index} of {where} is outside "
                         f"[0, {num_classes})")
    raise ValueError(f"{_OP}: class {index} has no example in {where}; every class in "
                     f"[0, {num_classes}) needs at least one sample")


def _raise_first_in_task0(labels, B, S, num_classes, lead, unsigned64):
    """With more classes than samples every task has an empty class: names task 0's first
    problem without the kernel's per-class counts (too large to allocate for a huge C)."""
    row = labels.reshape(B, S)[0].tolist()
    for s, value in enumerate(row):
        if not 0 <= value < num_classes:
            _raise_label_error(_OUT_OF_RANGE, 0, s, value, lead, num_classes, unsigned64)
    present = set(row)
    empty = next(c for c in range(num_classes) if c not in present)
    _raise_label_error(_EMPTY_CLASS, 0, empty, 0, lead, num_classes)


def _launch_forward(dev, z, labels, out, lead, num_classes, validate, dtype_code,
                    unsigned64=False):
    """Runs the forward kernel on int64 ``labels`` (``unsigned64``: converted from uint64)."""
    *_, S, D = z.shape
    B = math.prod(lead)
    if validate and B and num_classes > S:
        _raise_first_in_task0(labels, B, S, num_classes, lead, unsigned64)
    status = _C.class_prototypes_forward(*dev, dtype_code, B, S, num_classes, D, ptr(z),
                                         ptr(labels), ptr(out), validate)
    if status[0]:
        _raise_label_error(*status, lead, num_classes, unsigned64)


def _forward_kernel(z, labels, num_classes: int, validate: bool = False) -> torch.Tensor:
    lead = tuple(z.shape[:-2])
    unsigned64 = labels.dtype == torch.uint64
    z, labels = z.contiguous(), labels.contiguous().long()
    if z.is_neg() or labels.is_neg():  # dense() inlined: the hot path of small episodes
        z, labels = z.resolve_neg(), labels.resolve_neg()
    out = z.new_empty(*lead, num_classes, z.shape[-1])
    if out.numel() or validate:
        _launch_forward(launch(z), z, labels, out, lead, num_classes, validate,
                        DTYPE_CODES[z.dtype], unsigned64)
    return out


def _backward_kernel(grad, labels, num_classes: int) -> torch.Tensor:
    if batched(grad):  # autograd's own vmap: torch's ops (linear in z, so any z serves)
        z = torch.zeros(*labels.shape, grad.shape[-1], dtype=grad.dtype, device=grad.device)
        return reference_vjp(lambda a: reference.class_prototypes(a, labels, num_classes),
                             (z,), grad)[0]
    *lead, C, D = grad.shape
    S = labels.shape[-1]
    grad, labels = dense(grad), dense(labels).long()
    gz = grad.new_empty(*lead, S, D)
    if gz.numel():
        _C.class_prototypes_backward(*launch(grad), DTYPE_CODES[grad.dtype],
                                     math.prod(lead), S, C, D, ptr(grad),
                                     ptr(labels), ptr(gz))
    return gz


class _ClassPrototypes(torch.autograd.Function):
    @staticmethod
    def forward(z, labels, num_classes, validate):
        return _forward_kernel(z, labels, num_classes, validate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, labels, num_classes = inputs[:3]  # the registered op passes no validate
        ctx.save_for_backward(labels)
        ctx.save_for_forward(labels)
        ctx.num_classes = num_classes

    @staticmethod
    def jvp(ctx, dz, *_):
        """Forward-mode AD: the op is linear in z."""
        (labels,) = ctx.saved_tensors
        return _linear_map(dz, labels, ctx.num_classes)

    @staticmethod
    def backward(ctx, grad):
        (labels,) = ctx.saved_tensors
        if functorch_active() or torch.is_grad_enabled():  # a graph of the backward is built
            gz = apply_function(_ClassPrototypesBackward, grad, labels, ctx.num_classes)
        else:
            gz = _backward_kernel(grad, labels, ctx.num_classes)
        return gz, None, None, None

    @staticmethod
    def vmap(info, in_dims, z, labels, num_classes, validate):
        z, labels = batch_front(info.batch_size, in_dims[:2], z, labels)
        return _ClassPrototypes.apply(z, labels, num_classes, validate), 0


class _ClassPrototypesBackward(torch.autograd.Function):
    """grad_z[s] = grad[label_s] / count[label_s]. The map is linear, and its adjoint is the
    class mean itself, so the double backward is the forward kernel."""

    @staticmethod
    def forward(grad, labels, num_classes):
        return _backward_kernel(grad, labels, num_classes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, labels, num_classes = inputs
        ctx.save_for_backward(labels)
        ctx.save_for_forward(labels)
        ctx.num_classes = num_classes

    @staticmethod
    def jvp(ctx, dgrad, *_):
        (labels,) = ctx.saved_tensors  # linear in grad
        return _ClassPrototypesBackward.apply(dgrad, labels, ctx.num_classes)

    @staticmethod
    def backward(ctx, gg):
        (labels,) = ctx.saved_tensors
        return _linear_map(gg, labels, ctx.num_classes), None, None

    @staticmethod
    def vmap(info, in_dims, grad, labels, num_classes):
        grad, labels = batch_front(info.batch_size, in_dims[:2], grad, labels)
        return _ClassPrototypesBackward.apply(grad, labels, num_classes), 0


def _linear_map(t, labels, num_classes: int) -> torch.Tensor:
    """The op applied to a tangent or a gradient of gradients (unvalidated). Batched by
    autograd's own vmap (forward-mode jacobian, vectorized hessian), they have no storage
    for the kernel: torch's ops serve them."""
    if batched(t):
        return reference.class_prototypes(t, labels, num_classes)
    return apply_function(_ClassPrototypes, t, labels, num_classes, False)


# ---- registered ops, used under torch.compile ------------------------------------------

@torch.library.custom_op("pymeta::class_prototypes", mutates_args=())
def _class_prototypes_op(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    _check_tensors(z, labels, num_classes)  # a traced graph may replay any inputs
    return _forward_kernel(z, labels, num_classes)


@_class_prototypes_op.register_fake
def _(z, labels, num_classes):
    return z.new_empty(*z.shape[:-2], num_classes, z.shape[-1])


@torch.library.custom_op("pymeta::class_prototypes_backward", mutates_args=())
def _class_prototypes_backward_op(grad: torch.Tensor, labels: torch.Tensor,
                                  num_classes: int) -> torch.Tensor:
    _check_labels_dtype(labels)
    if labels.device != grad.device:
        raise ValueError(f"{_OP} backward: grad is on {grad.device} but labels are on "
                         f"{labels.device}")
    expected = (*labels.shape[:-1], num_classes)
    if grad.ndim < 2 or tuple(grad.shape[:-1]) != expected:
        raise ValueError(f"{_OP} backward: grad has shape {shape_str(grad.shape)}, expected "
                         f"{shape_str(expected)} + [features]")
    check_float_tensors(_OP, numpy=False, grad=grad)
    return _backward_kernel(grad, labels, num_classes)


@_class_prototypes_backward_op.register_fake
def _(grad, labels, num_classes):
    return grad.new_empty(*labels.shape, grad.shape[-1])


def _op_backward(ctx, grad):
    (labels,) = ctx.saved_tensors
    return torch.ops.pymeta.class_prototypes_backward(grad, labels, ctx.num_classes), None, None


def _op_double_backward(ctx, gg):
    (labels,) = ctx.saved_tensors
    return torch.ops.pymeta.class_prototypes(gg, labels, ctx.num_classes), None, None


# The Functions' setup_context also serve the registered ops (same leading inputs).
_class_prototypes_op.register_autograd(_op_backward, setup_context=_ClassPrototypes.setup_context)
_class_prototypes_backward_op.register_autograd(
    _op_double_backward, setup_context=_ClassPrototypesBackward.setup_context)


# ---- public API -------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_validate(validate) -> None:
    if not isinstance(validate, (bool, np.bool_)):
        raise TypeError(f"{_OP}: validate must be True or False, got {validate!r}")


def _check_tensors(z, labels, num_classes) -> None:
    check_float_tensors(_OP, z=z)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{_OP}: labels must be a torch.Tensor, got {type(labels).__name__}")
    _check_labels_dtype(labels)
    if labels.layout is not torch.strided:
        raise TypeError(f"{_OP}: labels is a {labels.layout} tensor; pass a dense one "
                        "(.to_dense())")
    if labels.device != z.device:
        raise ValueError(f"{_OP}: z is on {z.device} but labels are on {labels.device}")
    _check_shapes(z, labels, num_classes)


def _check_labels_dtype(labels) -> None:
    kind = labels.dtype.kind if isinstance(labels, np.ndarray) else (
        "b" if labels.dtype == torch.bool else "f" if labels.is_floating_point() or
        labels.is_complex() else "i")
    if kind not in "iu":
        raise TypeError(f"{_OP}: labels must be an integer array/tensor, got {labels.dtype}")


def _numpy(z, labels, num_classes: int, validate: bool) -> np.ndarray:
    if not (isinstance(z, np.ndarray) and isinstance(labels, np.ndarray)):
        raise TypeError(f"{_OP}: z and labels must both be numpy arrays or both torch tensors")
    _check_validate(validate)
    _check_labels_dtype(labels)
    z = numpy_float(_OP, "z", z)
    _check_shapes(z, labels, num_classes)
    lead = tuple(z.shape[:-2])
    unsigned64 = labels.dtype == np.uint64
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    out = np.empty((*lead, num_classes, z.shape[-1]), z.dtype)
    if out.size or validate:
        _launch_forward(numpy_launch(), z, labels, out, lead, int(num_classes), bool(validate),
                        NUMPY_DTYPE_CODES[z.dtype], unsigned64)
    return out


def class_prototypes(z, labels, num_classes: int, validate: bool = True):
    """Mean embedding of each class, task by task (Prototypical Networks' prototypes).

    Args:
        z: embeddings ``[..., S, D]`` (torch tensor or numpy array).
        labels: integer class of each sample ``[..., S]``, in ``[0, num_classes)``. Need not
            be sorted; shots may differ per class.
        num_classes: number of classes C per task.
        validate: check that every label is in range and every class has an example, and
            raise ``ValueError`` naming the task and class otherwise (a host sync on CUDA).
            Skipped under ``torch.compile`` and CUDA graph capture. Unvalidated,
            out-of-range labels are ignored and an empty class gives NaN; memory is never
            touched out of bounds.

    Returns:
        ``[..., C, D]``, differentiable (to any order) in ``z``.

    Example:
        >>> import torch, pymeta.ops as ops
        >>> z = torch.randn(32, 25, 64)                       # 5-way 5-shot, 32 tasks
        >>> labels = torch.arange(5).repeat(5).expand(32, 25)
        >>> ops.class_prototypes(z, labels, 5).shape
        torch.Size([32, 5, 64])
    """
    if isinstance(z, np.ndarray) or isinstance(labels, np.ndarray):
        return _numpy(z, labels, num_classes, validate)
    foreign = False
    if not (valid_float_tensors(z) and type(labels) in PLAIN_TYPES
            and labels.dtype in _INDEX_DTYPES and labels.layout is torch.strided
            and labels.device == z.device
            and type(num_classes) is int and 0 <= num_classes <= _MAX_CLASSES and z.ndim >= 2
            and labels.shape == z.shape[:-1] and (validate is True or validate is False)):
        z, = autocast_float32(z)
        _check_tensors(z, labels, num_classes)  # the slow path names the problem
        foreign = wrapped(z, labels)
        _check_validate(validate)
        validate = bool(validate)
        if not isinstance(num_classes, torch.SymInt):  # a SymInt: a traced dynamic size
            num_classes = int(num_classes)
    if foreign or recording():
        return torch.ops.pymeta.class_prototypes(z, labels, num_classes)
    if validate and z.is_cuda and torch.cuda.is_current_stream_capturing():
        validate = False  # its host sync is illegal while a CUDA graph is being captured
    if functorch_active() or needs_autograd(z):
        return apply_function(_ClassPrototypes, z, labels, num_classes, validate)
    return _forward_kernel(z, labels, num_classes, validate)
