"""Adapter from torch tensors and numpy arrays to the raw-buffer kernels in ``pymeta._C``.

The compiled core takes data pointers, sizes, a dtype code and (on CUDA) a stream handle;
this module turns tensors into those arguments and holds the checks every op shares.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _C

# Codes shared with csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
NUMPY_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_BUILT: bool = _C.cuda_built


_forked = False


def _after_fork_in_child() -> None:
    # GNU OpenMP's thread pool does not survive fork(): a forked child that opens a parallel
    # region hangs. pymeta's kernels therefore run single-threaded in forked children (torch's
    # DataLoader workers use one thread anyway).
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_threads() -> int:
    return 1 if _forked else torch.get_num_threads()


def launch(t: torch.Tensor) -> tuple[int, int, int]:
    """(device index or -1 for CPU, CUDA stream handle, CPU thread count) for a kernel call."""
    if t.is_cuda:
        index = t.device.index
        return index, torch.cuda.current_stream(index).cuda_stream, 1
    return -1, 0, cpu_threads()


def numpy_launch() -> tuple[int, int, int]:
    return -1, 0, cpu_threads()


def functorch_active() -> bool:
    """True inside torch.func transforms, where tensors are wrappers without data pointers."""
    return torch._C._are_functorch_transforms_active()


def apply_function(cls, *args):
    """``cls.apply(*args)`` without the per-call ``inspect.signature`` binding that
    ``Function.apply`` does for setup_context-style functions (the larger part of an eager
    small-op call). All our arguments are positional; functorch keeps the full path."""
    if functorch_active():
        return cls.apply(*args)
    return super(torch.autograd.Function, cls).apply(*args)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through the autograd Function: backward graph wanted, or
    forward-mode AD active (whose missing jvp then raises, instead of a lost tangent)."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            or forward_ad_active())


def forward_ad_active() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: inputs may carry tangents."""
    return _forward_ad._current_level >= 0


def has_tangent(*tensors: torch.Tensor) -> bool:
    """Whether any tensor is a dual tensor of the current forward-AD level."""
    return any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def recording() -> bool:
    """True where tensors carry no data for the raw kernels: torch.compile, jit.trace and
    dispatch modes (make_fx, FakeTensorMode). The registered ops and their fake rules serve
    those."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._get_tracing_state() is not None)


# Tensor types whose data the kernels read directly; subclasses take the general path.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def wrapped(*tensors) -> bool:
    """Whether any tensor is a Python-dispatch subclass (a wrapper such as torch's TwoTensor,
    a fake tensor): its data is not in its own storage, so the registered ops (which such
    subclasses dispatch) or torch's ops serve it."""
    for t in tensors:
        if (type(t) not in PLAIN_TYPES and isinstance(t, torch.Tensor)
                and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)):
            return True
    return False


def batched(*tensors) -> bool:
    """Whether a gradient is batched by autograd's own vmap (``is_grads_batched``,
    ``jacobian(vectorize=True)``): such tensors have no storage for the kernels to read."""
    return not functorch_active() and any(t is not None and not torch._C._has_storage(t)
                                          for t in tensors)


def reference_vjp(fn, inputs, grads):
    """The gradients of ``fn(*inputs)`` (torch's ops) for ``grads``: the backward of
    :func:`batched` gradients, which torch's own ops take."""
    with torch.enable_grad():
        xs = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*xs), xs, grads, allow_unused=True)


def valid_float_tensors(*tensors) -> bool:
    """The cheap common-case test behind :func:`check_float_tensors` (no message built)."""
    t0 = tensors[0]
    if type(t0) not in PLAIN_TYPES:
        return False
    dtype, device = t0.dtype, t0.device
    for t in tensors:
        if (type(t) not in PLAIN_TYPES or t.dtype is not dtype or t.device != device
                or t.layout is not torch.strided):
            return False
    if t0.is_cpu:
        return dtype in CPU_DTYPES
    return t0.is_cuda and CUDA_BUILT and dtype in DTYPE_CODES


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast_float32(*tensors):
    """Under autocast (for the first tensor's device type) the ops compute in float32, as
    torch.cdist and autocast's other float32 ops do: float16/bfloat16 tensors are cast up.
    Anything else, and everything outside autocast, is returned as it is."""
    t0 = tensors[0]
    if (isinstance(t0, torch.Tensor)
            and any(isinstance(t, torch.Tensor) and t.dtype in _HALF_DTYPES for t in tensors)
            and torch.is_autocast_enabled(t0.device.type)):
        return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF_DTYPES
                     else t for t in tensors)
    return tensors


def check_float_tensors(op: str, numpy: bool = True, **tensors: torch.Tensor) -> torch.Tensor:
    """Checks that all tensors share one supported floating dtype and one device (``numpy``:
    whether the op also takes numpy arrays, for the message)."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor{' or numpy array' * numpy}, "
                            f"got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.layout is not torch.strided:
            raise TypeError(f"{op}: {name} is a {t.layout} tensor; pass a dense one "
                            "(.to_dense())")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {name0} is {t0.dtype} but {name} is {t.dtype}; use one dtype")
        if t.device != t0.device:
            raise ValueError(f"{op}: {name0} is on {t0.device} but {name} is on {t.device}")
    if t0.is_cuda:
        if not CUDA_BUILT:
            raise RuntimeError(f"{op}: pymeta was built without CUDA kernels; reinstall it "
                               "with a CUDA toolkit present (PYMETA_CUDA=ON)")
        if t0.dtype not in DTYPE_CODES:
            raise TypeError(f"{op}: unsupported CUDA dtype {t0.dtype}")
    elif t0.device.type != "cpu":
        raise ValueError(f"{op}: unsupported device {t0.device}; use cpu or cuda")
    elif t0.dtype not in CPU_DTYPES:
        raise TypeError(f"{op}: CPU kernels support float32 and float64, got {t0.dtype} "
                        "(cast with .float())")
    return t0


def numpy_float(op: str, name: str, a: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """A C-contiguous, element-aligned float32/float64 copy-if-needed of ``a`` (a buffer
    view at an odd offset is contiguous but not aligned, which the kernels assume)."""
    if a.dtype.kind == "f" and not a.dtype.isnative:  # big-endian data, say: native copy
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind != "f" or a.dtype not in NUMPY_DTYPE_CODES:
        raise TypeError(f"{op}: {name} must be a float32 or float64 array, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{op}: arrays must share one dtype, got {dtype} and {a.dtype} ({name})")
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, requirements=("C", "A"))  # np.ascontiguousarray makes 0-d 1-d


def dense(t: torch.Tensor, memory_format=None) -> torch.Tensor:
    """``t`` contiguous (in ``memory_format``, if given) with its values in memory, for a
    kernel: a tensor with the negative bit (``torch._neg_view``, ``.conj().imag``) stores
    them negated. (No keyword for the default: torch parses one at a cost per call.)"""
    t = t.contiguous() if memory_format is None else t.contiguous(memory_format=memory_format)
    return t.resolve_neg() if t.is_neg() else t


def ptr(t: torch.Tensor | np.ndarray | None) -> int:
    if t is None:
        return 0
    if isinstance(t, np.ndarray):
        return t.ctypes.data
    return t.data_ptr()


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def batch_front(batch_size: int, in_dims, *tensors):
    """For vmap rules: the vmapped dim of every tensor moved to the front, unbatched ones
    expanded, so ops that accept any leading (task) dims can run the whole batch at once."""
    return tuple(
        t if t is None else
        t.unsqueeze(0).expand(batch_size, *t.shape) if d is None else t.movedim(d, 0)
        for t, d in zip(tensors, in_dims))
