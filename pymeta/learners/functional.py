"""Task-batched functional forward: one network, ``T`` sets of weights, one call.

:func:`batched_forward` runs ``module`` on ``x [T, B, *sample]`` where task ``t`` uses its
own weights ``params[name][t]``. Gradient-based meta-learners need this for their inner
loops: every task's fast weights differ after the first step.

Two paths, picked automatically:

- **Batched** (every submodule is of a supported type, see :func:`is_batchable`): a walk over
  the module tree that runs each layer once for all tasks. Convolutions and BatchNorm work on
  a *grouped* layout ``[B, T*C, H, W]``: the convolution is a grouped convolution with
  ``T * groups`` groups and weight ``[T*Cout, Cin/groups, k, k]``, and BatchNorm's
  per-channel batch statistics are then per-task statistics for free. Linear layers work on a
  *flat* layout ``[T*B, ..., D]`` with one batched matmul. Parameter-free layers run on
  whichever layout they receive. Activations are kept channels_last when the model's conv
  weights are (as :class:`pymeta.nn.Conv4` and :class:`pymeta.nn.ResNet12` keep them).
- **Per task** (anything else): a loop over tasks with :func:`torch.func.functional_call`,
  correct for any module.

Grouped convolution was chosen over unfold + batched matmul: for conv4 (64 channels, 28x28,
5-way 1-shot 15-query, 32 tasks, one second-order MAML step, float32, 1 CPU thread) it took
8.0 s (channels_last) / 8.3 s against 20.1 s for unfold + matmul.

BatchNorm: in training, statistics come from each task's own batch (as in MAML), except in
a BatchNorm the user left in eval mode (frozen), which keeps its running ones. In eval,
``bn_mode="transductive"`` (default) still uses each task's batch statistics, and
``bn_mode="running"`` uses the module's running statistics. When training with
``update_stats=True``, the running statistics get the mean over tasks of the per-task
momentum updates (detached).

On CPU, conv4's block tail (BatchNorm with batch statistics, ReLU, 2x2 max-pool) on the
grouped channels_last layout runs as one kernel, :func:`pymeta.ops.batch_norm_relu_pool`:
it stores only the convolution output and has analytic first and second derivatives, which
halves what a task's MAML step keeps for backward (``fused=False`` keeps torch's ops).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.backbones import Conv4, ResNet12, _pooled, _ResidualBlock, kept_modes
from ..ops.batch_norm_relu_pool import batch_norm_relu_pool

BN_MODES = ("transductive", "running")


class _Act(NamedTuple):
    """An activation and its layout: grouped ``[B, T*C, *spatial]`` or flat ``[T*B, ...]``."""
    x: Tensor
    grouped: bool


class _Ctx:
    """What every layer rule needs: task count, weights, buffers and modes."""

    def __init__(self, T: int, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 training: bool, bn_mode: str, update_stats: bool, channels_last: bool,
                 fuse: bool) -> None:
        self.T, self.params, self.buffers = T, params, buffers
        self.training, self.update_stats = training, update_stats
        self.transductive = bn_mode == "transductive"
        self.channels_last, self.fuse = channels_last, fuse

    def trains(self, m: nn.Module) -> bool:
        """Train mode for layer ``m``: a submodule the user put in eval mode (a frozen
        BatchNorm, a disabled Dropout) stays in it while the rest trains."""
        return self.training and m.training

    def batch_stats(self, m: _BatchNorm) -> bool:
        """BatchNorm ``m`` normalises with batch statistics: when it trains, and in
        transductive evaluation; a frozen one uses its running statistics in training."""
        return _bn_batch_stats(self.training, m.training, self.transductive)

    def stacked(self, name: str, default: Optional[Tensor]) -> Optional[Tensor]:
        """The weight ``name`` as ``[T, ...]`` (shared weights are expanded, not copied)."""
        p = self.params.get(name, default)
        if p is None or default is None or p.dim() == default.dim() + 1:
            return p
        return p.expand(self.T, *p.shape)

    def buffer(self, name: str, default: Optional[Tensor]) -> Optional[Tensor]:
        return self.buffers.get(name, default)


# ---- layout changes ----------------------------------------------------------------------

def _grouped(a: _Act, ctx: _Ctx) -> _Act:
    """``[T*B, C, *s]`` -> ``[B, T*C, *s]`` in one copy (channels_last for images if wanted)."""
    if a.grouped:
        return a
    x, T = a.x, ctx.T
    B, (C, *s) = x.shape[0] // T, x.shape[1:]
    x = x.reshape(T, B, C, *s)
    if ctx.channels_last and len(s) == 2 and T * C == 1:
        # One channel: NCHW and NHWC are the same memory, but the strides must say NHWC, or
        # the convolution's output and everything after it falls back to slow NCHW kernels.
        x = x.reshape(B, *s).unsqueeze(-1).permute(0, 3, 1, 2)
    elif ctx.channels_last and len(s) == 2:  # memory (B, H, W, T, C) = channels_last
        x = x.permute(1, 3, 4, 0, 2).contiguous().view(B, *s, T * C).permute(0, 3, 1, 2)
    else:
        x = x.transpose(0, 1).reshape(B, T * C, *s)
    return _Act(x, True)


def _flat(a: _Act, ctx: _Ctx) -> _Act:
    """``[B, T*C, *s]`` -> ``[T*B, C, *s]``."""
    if not a.grouped:
        return a
    x, T = a.x, ctx.T
    B, TC, *s = x.shape
    x = x.reshape(B, T, TC // T, *s).transpose(0, 1).reshape(T * B, TC // T, *s)
    return _Act(x, False)


# ---- layer rules ---------------------------------------------------------------------------

Rule = Callable[[nn.Module, str, _Act, _Ctx], _Act]


def _sequential(m: nn.Sequential, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    children = list(m._modules.items())  # every use: named_children() skips a reused module
    i = 0
    while i < len(children):
        name, child = children[i]
        if ctx.fuse and _pool_tail(children[i:i + 3], a, ctx):
            a, i = _batch_norm_relu_pool(child, f"{prefix}{name}.", a, ctx), i + 3
        else:
            a, i = _run(child, f"{prefix}{name}.", a, ctx), i + 1
    return a


def _layer(m: nn.Module, prefix: str) -> str:
    """A layer as error messages name it: its type and its name in the model."""
    return f"{type(m).__name__} {prefix[:-1] or '(the model)'}"


def _conv2d(m: nn.Conv2d, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    a = _grouped(a, ctx)
    sample = [a.x.shape[1] // ctx.T, *a.x.shape[2:]]
    if a.x.ndim != 4 or sample[0] != m.in_channels:  # torch's message: T*C channels, groups=T
        raise ValueError(f"{_layer(m, prefix)}: expects samples [{m.in_channels}, H, W], got "
                         f"samples {sample}")
    w = ctx.stacked(prefix + "weight", m.weight)
    b = ctx.stacked(prefix + "bias", m.bias)
    w = w.reshape(-1, *w.shape[2:])
    b = None if b is None else b.reshape(-1)
    return _Act(F.conv2d(a.x, w, b, m.stride, m.padding, m.dilation, ctx.T * m.groups), True)


def _batch_norm(m: _BatchNorm, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    a = _grouped(a, ctx)
    T = ctx.T
    w, b = ctx.stacked(prefix + "weight", m.weight), ctx.stacked(prefix + "bias", m.bias)
    w = None if w is None else w.reshape(-1)
    b = None if b is None else b.reshape(-1)
    mean = ctx.buffer(prefix + "running_mean", m.running_mean)
    var = ctx.buffer(prefix + "running_var", m.running_var)
    if mean is not None and not ctx.batch_stats(m):  # non-transductive eval, or frozen
        y = _nhwc_batch_norm(a.x, mean.repeat(T), var.repeat(T), w, b, False, 0.0, m.eps)
        return _Act(y, True)
    if a.x.numel() == a.x.shape[1]:  # torch's own message would count T * C channels
        raise ValueError(f"{_layer(m, prefix)}: batch statistics need more "
                         f"than one value per channel in each task, but each task has one "
                         f"sample of {a.x.shape[1] // T} channels (use more samples per task, "
                         f"or bn_mode='running' in evaluation)")
    if mean is not None and ctx.trains(m) and ctx.update_stats:
        factor = _momentum(m, prefix, ctx)
        rm, rv = mean.repeat(T), var.repeat(T)  # per-task updates, averaged below
        y = _nhwc_batch_norm(a.x, rm, rv, w, b, True, factor, m.eps)
        with torch.no_grad():
            mean.copy_(rm.view(T, -1).mean(0))
            var.copy_(rv.view(T, -1).mean(0))
    else:
        y = _nhwc_batch_norm(a.x, None, None, w, b, True, 0.0, m.eps)
    return _Act(y, True)


def _pool_tail(layers: list, a: _Act, ctx: _Ctx) -> bool:
    """Whether ``layers`` are BatchNorm2d (batch statistics), ReLU and a plain 2x2 max-pool
    over a channels_last float CPU activation: conv4's block tail, which
    :func:`batch_norm_relu_pool` runs as one kernel."""
    if len(layers) < 3:
        return False
    (_, bn), (_, relu), (_, pool) = layers
    if (type(bn) is not nn.BatchNorm2d or bn.weight is None or type(relu) is not nn.ReLU
            or type(pool) is not nn.MaxPool2d or not ctx.batch_stats(bn)):
        return False
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    plain_pool = (pair(pool.kernel_size) == (2, 2) and pair(pool.stride or 2) == (2, 2)
                  and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1)
                  and not pool.ceil_mode and not pool.return_indices)
    x = a.x
    return (plain_pool and x.ndim == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and min(x.shape[2:]) >= 2
            and x.is_contiguous(memory_format=torch.channels_last))


def _batch_norm_relu_pool(m: nn.BatchNorm2d, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    a = _grouped(a, ctx)
    w = ctx.stacked(prefix + "weight", m.weight).reshape(-1)
    b = ctx.stacked(prefix + "bias", m.bias).reshape(-1)
    y, mean, var = batch_norm_relu_pool(a.x, w, b, m.eps)
    if m.running_mean is not None and ctx.trains(m) and ctx.update_stats:
        B, _, H, W = a.x.shape
        n = B * H * W  # >= 2: the op checks it
        _update_running(m, prefix, ctx, mean, var * (n / (n - 1)))
    return _Act(y, True)


def _update_running(m: _BatchNorm, prefix: str, ctx: _Ctx, mean: Tensor, var: Tensor) -> None:
    """nn.BatchNorm's momentum update with the mean over tasks of the per-task statistics
    ``[T*C]`` (``var`` unbiased)."""
    factor = _momentum(m, prefix, ctx)
    with torch.no_grad():
        for name, stat in (("running_mean", mean), ("running_var", var)):
            buf = ctx.buffer(prefix + name, getattr(m, name))
            buf.mul_(1 - factor).add_(stat.detach().view(ctx.T, -1).mean(0).to(buf.dtype),
                                      alpha=factor)


def _nhwc_batch_norm(x: Tensor, *args) -> Tensor:
    """``F.batch_norm``; a channels_last ``[B, C, H, W]`` runs as the free 2-D view
    ``[B*H*W, C]``. Same result, but torch's double backward reduces a channels_last 4-D
    tensor over dim 0 about 12x slower than a 2-D one (39 vs 3 ms for MAML's conv4 support
    activations of 32 tasks; BatchNorm forward + double backward 789 -> 305 ms)."""
    if x.ndim != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.batch_norm(x, *args)
    B, C, H, W = x.shape
    y = F.batch_norm(x.permute(0, 2, 3, 1).reshape(-1, C), *args)
    return y.view(B, H, W, C).permute(0, 3, 1, 2)


def _momentum(m: _BatchNorm, prefix: str, ctx: _Ctx) -> float:
    """nn.BatchNorm's update factor; counts the batch like nn.BatchNorm does."""
    tracked = ctx.buffer(prefix + "num_batches_tracked", m.num_batches_tracked)
    if tracked is not None:
        tracked.add_(1)
    if m.momentum is None:  # cumulative moving average
        return 1.0 / float(tracked)
    return m.momentum


def _linear(m: nn.Linear, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    x = _flat(a, ctx).x
    if x.ndim < 2 or x.shape[-1] != m.in_features:  # torch's message: the stacked layout
        raise ValueError(f"{_layer(m, prefix)}: expects samples [..., {m.in_features}], got "
                         f"samples {list(x.shape[1:])}")
    w, b = ctx.params.get(prefix + "weight", m.weight), ctx.params.get(prefix + "bias", m.bias)
    if w.dim() == 2 and (b is None or b.dim() == 1):  # shared weights: one plain matmul
        return _Act(F.linear(x, w, b), False)
    w, b = ctx.stacked(prefix + "weight", m.weight), ctx.stacked(prefix + "bias", m.bias)
    lead = x.shape[:-1]
    x = x.reshape(ctx.T, -1, x.shape[-1])                     # [T, B*..., in]
    y = (torch.bmm(x, w.transpose(1, 2)) if b is None
         else torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)))
    return _Act(y.reshape(*lead, -1), False)


def _flatten(m: nn.Flatten, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    return _Act(m(_flat(a, ctx).x), False)


def _any_layout(fn: Callable[[nn.Module, Tensor, _Ctx], Tensor]) -> Rule:
    """A per-sample, per-channel layer: the same result on either layout."""
    return lambda m, prefix, a, ctx: _Act(fn(m, a.x, ctx), a.grouped)


def _conv4(m: Conv4, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    _check_input("Conv4", a, ctx, m.in_channels, 4 if m.pool_last else 3)
    a = _sequential(m.blocks, prefix + "blocks.", a, ctx)
    return _Act(_flat(a, ctx).x.flatten(1), False) if m.flatten else a


def _resnet12(m: ResNet12, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    _check_input("ResNet12", a, ctx, m.in_channels, 4)
    a = _sequential(m.blocks, prefix + "blocks.", a, ctx)
    return _Act(a.x.mean((-2, -1)), a.grouped) if m.flatten else a


def _residual_block(m: _ResidualBlock, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    a = _grouped(a, ctx)
    out = a
    for i, conv in enumerate(m.convs):
        out = _sequential(conv, f"{prefix}convs.{i}.", out, ctx)
        if i < 2:
            out = _Act(F.leaky_relu(out.x, 0.1), True)
    short = _sequential(m.shortcut, prefix + "shortcut.", a, ctx)
    y = m.pool(F.leaky_relu(out.x + short.x, 0.1))
    return _Act(F.dropout(y, m.drop_rate, ctx.trains(m)) if m.drop_rate else y, True)


def _check_input(who: str, a: _Act, ctx: _Ctx, channels: int, pools: int) -> None:
    C = a.x.shape[1] // ctx.T if a.grouped else a.x.shape[1]
    if a.x.ndim != 4 or C != channels:
        raise ValueError(f"{who}: expected input [T, B, {channels}, H, W], got "
                         f"[{ctx.T}, ...] with per-sample shape {list(a.x.shape[1:])}")
    _pooled(who, (channels, *a.x.shape[2:]), channels, pools)  # images large enough


def _no_indices(m: nn.Module) -> bool:
    return not getattr(m, "return_indices", False)


_RULES: dict[type, Rule] = {
    nn.Sequential: _sequential, nn.Conv2d: _conv2d, nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm, nn.Linear: _linear, nn.Flatten: _flatten,
    Conv4: _conv4, ResNet12: _resnet12, _ResidualBlock: _residual_block,
    nn.ReLU: _any_layout(lambda m, x, c: F.relu(x)),
    nn.ReLU6: _any_layout(lambda m, x, c: F.relu6(x)),
    nn.LeakyReLU: _any_layout(lambda m, x, c: F.leaky_relu(x, m.negative_slope)),
    nn.ELU: _any_layout(lambda m, x, c: F.elu(x, m.alpha)),
    nn.GELU: _any_layout(lambda m, x, c: F.gelu(x, approximate=m.approximate)),
    nn.SiLU: _any_layout(lambda m, x, c: F.silu(x)),
    nn.Sigmoid: _any_layout(lambda m, x, c: torch.sigmoid(x)),
    nn.Tanh: _any_layout(lambda m, x, c: torch.tanh(x)),
    nn.Identity: _any_layout(lambda m, x, c: x),
    nn.Dropout: _any_layout(lambda m, x, c: F.dropout(x, m.p, c.trains(m))),
    nn.Dropout2d: _any_layout(lambda m, x, c: F.dropout2d(x, m.p, c.trains(m))),
    nn.MaxPool2d: _any_layout(lambda m, x, c: m(x)),
    nn.AvgPool2d: _any_layout(lambda m, x, c: m(x)),
    nn.AdaptiveAvgPool2d: _any_layout(lambda m, x, c: m(x)),
    nn.AdaptiveMaxPool2d: _any_layout(lambda m, x, c: m(x)),
}

# Per-module conditions beyond the type (else the per-task path runs).
_CONDITIONS: dict[type, Callable[[nn.Module], bool]] = {
    nn.Conv2d: lambda m: m.padding_mode == "zeros",
    nn.BatchNorm1d: lambda m: (m.running_mean is None) == (m.running_var is None),
    nn.BatchNorm2d: lambda m: (m.running_mean is None) == (m.running_var is None),
    nn.Flatten: lambda m: m.start_dim != 0 and m.end_dim != 0,
    nn.MaxPool2d: _no_indices, nn.AdaptiveMaxPool2d: _no_indices,
}


def _run(m: nn.Module, prefix: str, a: _Act, ctx: _Ctx) -> _Act:
    return _RULES[type(m)](m, prefix, a, ctx)


def is_batchable(module: nn.Module) -> bool:
    """Whether :func:`batched_forward` can take the batched path for ``module``: every
    submodule is of a supported type (exact type: a subclass may change ``forward``).

    Example:
        >>> from pymeta.nn import Conv4
        >>> is_batchable(nn.Sequential(Conv4(hidden=4, out_channels=4), nn.Linear(4, 5)))
        True
        >>> is_batchable(nn.Sequential(nn.LSTM(3, 3)))
        False
    """
    kind = type(module)
    if kind is nn.ModuleList:  # only reachable through a rule that iterates it
        return all(is_batchable(c) for c in module.children())
    if kind not in _RULES or not _CONDITIONS.get(kind, lambda m: True)(module):
        return False
    return all(is_batchable(c) for c in module.children())


def _wants_channels_last(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and not m.weight.is_contiguous()
               and m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in module.modules())


# ---- entry point ---------------------------------------------------------------------------

def batched_forward(module: nn.Module, params: Mapping[str, Tensor], buffers:
                    Optional[Mapping[str, Tensor]], x: Tensor, *, bn_mode: str = "transductive",
                    training: Optional[bool] = None, update_stats: bool = True,
                    per_task: bool = False, fused: bool = True) -> Tensor:
    """Runs ``module`` for ``T`` tasks at once, each with its own weights.

    Args:
        module: the network; maps ``[B, *sample]`` to ``[B, *out]``.
        params: parameter name (as in ``module.named_parameters()``) -> ``[T, *shape]``
            per-task weights, or ``[*shape]`` shared by all tasks. Missing names use the
            module's own parameter (shared).
        buffers: name -> buffer (BatchNorm running statistics); ``None`` or missing names use
            the module's own. Updated in place when statistics are updated.
        x: inputs ``[T, B, *sample]``.
        bn_mode: ``"transductive"`` (per-task batch statistics in eval too) or ``"running"``
            (running statistics in eval).
        training: the mode for BatchNorm and dropout; defaults to ``module.training``.
        update_stats: in training, update BatchNorm running statistics (the mean over tasks of
            the per-task updates, detached).
        per_task: force the per-task loop (for testing and debugging).
        fused: run conv4's BatchNorm - ReLU - max-pool tails (with batch statistics, on
            CPU) as one kernel, :func:`pymeta.ops.batch_norm_relu_pool`: less memory, faster,
            differentiable twice (second-order MAML; a graph of the second derivative,
            ``create_graph=True`` on it, raises). ``False`` keeps torch's three ops,
            differentiable to any order.

    Returns:
        ``[T, B, *out]``.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> fast = {n: p.expand(5, *p.shape) + 0.1 * torch.randn(5, *p.shape)
        ...         for n, p in net.named_parameters()}                  # 5 tasks
        >>> batched_forward(net, fast, None, torch.randn(5, 7, 3)).shape
        torch.Size([5, 7, 2])
    """
    T = _check_inputs(module, params, x, bn_mode)
    per_task = per_task or type(module) not in _RULES or not is_batchable(module)
    params = _with_aliases(module, params, every_use=not per_task)
    training = module.training if training is None else training
    if buffers is None:
        buffers = dict(module.named_buffers())
    if per_task:
        return _per_task(module, params, buffers, x, training, bn_mode, update_stats)
    # (under torch.func and tracers the op itself runs torch's ops)
    ctx = _Ctx(T, params, buffers, training, bn_mode, update_stats, _wants_channels_last(module),
               fused)
    a = _run(module, "", _Act(x.reshape(-1, *x.shape[2:]), False), ctx)
    y = _flat(a, ctx).x
    return y.reshape(T, -1, *y.shape[1:])


def _check_inputs(module: nn.Module, params: Mapping[str, Tensor], x: Tensor,
                  bn_mode: str) -> int:
    if not isinstance(module, nn.Module):
        raise TypeError(f"batched_forward: module must be an nn.Module, got "
                        f"{type(module).__name__}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"batched_forward: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError("batched_forward: x must be a tensor [T, B, *sample], got "
                         f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    T = x.shape[0]
    own = dict(module.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        if name not in own:
            raise ValueError(f"batched_forward: {name!r} is not a parameter of "
                             f"{type(module).__name__}")
        shape = own[name].shape
        if p.shape != shape and p.shape != (T, *shape):
            raise ValueError(f"batched_forward: {name!r} must be {list(shape)} (shared) or "
                             f"{[T, *shape]} (per task, T={T} from x), got {list(p.shape)}")
    return T


def _with_aliases(module: nn.Module, params: Mapping[str, Tensor],
                  every_use: bool) -> Mapping[str, Tensor]:
    """``params`` plus, for a parameter the model holds under several names (tied weights,
    a module used twice), its other names mapped to the same tensor. ``every_use``: the name
    of every use (the batched rules look weights up by the path they run); otherwise one name
    per module attribute (functional_call swaps each attribute once, or a reused module is
    left holding the swapped-in tensor)."""
    first = {id(p): n for n, p in module.named_parameters()}
    if every_use:
        names = module.named_parameters(remove_duplicate=False)
    else:
        names = ((f"{prefix}.{a}" if prefix else a, p) for prefix, m in module.named_modules()
                 for a, p in m._parameters.items() if p is not None)
    out = None
    for name, p in names:
        canonical = first[id(p)]
        if name != canonical and canonical in params and name not in params:
            out = dict(params) if out is None else out
            out[name] = params[canonical]
    return params if out is None else out


def _per_task(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
              x: Tensor, training: bool, bn_mode: str, update_stats: bool) -> Tensor:
    """The fallback: one functional_call per task, BatchNorm statistics on per-task copies."""
    own = dict(module.named_parameters(remove_duplicate=False))
    T = x.shape[0]
    outs, states = [], []
    with _modes(module, training, bn_mode == "transductive"):
        for t in range(T):
            weights = {n: p[t] if p.dim() == own[n].dim() + 1 else p for n, p in params.items()}
            state = {n: b.clone() for n, b in buffers.items()}
            outs.append(torch.func.functional_call(module, {**weights, **state}, (x[t],),
                                                   tie_weights=False))  # aliases are given
            states.append(state)
    if training and update_stats:
        with torch.no_grad():
            for n, b in buffers.items():
                if all(torch.equal(s[n], b) for s in states):
                    continue  # not a statistic any task updated: rewriting it as a mean drifts
                if b.is_floating_point():
                    b.copy_(torch.stack([s[n] for s in states]).mean(0))
                else:  # num_batches_tracked: one batch per call, as in the batched path
                    b.copy_(states[0][n])
    return torch.stack(outs)


@contextlib.contextmanager
def _modes(module: nn.Module, training: bool, transductive: bool) -> Iterator[None]:
    """Temporarily sets each submodule's mode as the batched rules read it (see
    :meth:`_Ctx.trains` and :meth:`_Ctx.batch_stats`)."""
    with kept_modes(module) as saved:
        for m, own in saved:
            m.training = (_bn_batch_stats(training, own, transductive)
                          if isinstance(m, _BatchNorm) else training and own)
        yield


def _bn_batch_stats(training: bool, own: bool, transductive: bool) -> bool:
    return training and own or not training and transductive


__all__ = ["batched_forward", "is_batchable", "BN_MODES"]
