"""Gradient-based meta-learners batched over tasks: MAML, FOMAML, Meta-SGD and ANIL.

Every task of a meta-batch gets its own fast weights ``[T, ...]``; the inner loop runs all
tasks at once through :func:`pymeta.learners.functional.batched_forward` and steps them with
the fused :func:`pymeta.ops.sgd_step`. The first inner step differentiates the summed
per-task support losses w.r.t. the shared weights expanded to ``[T, ...]``, which gives each
task its own gradient.

- :class:`MAML` (Finn et al. 2017), second order by default; optional MAML++ per-step
  per-layer rates (``lslr=True``, Antoniou et al. 2019).
- :class:`FOMAML`: first order; the meta-gradient is the query gradient at the adapted weights.
- :class:`MetaSGD` (Li et al. 2017): a learned rate per parameter element.
- :class:`ANIL` (Raghu et al. 2020): only the head adapts; the body runs once per meta-batch.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._checks import check_bool, check_count, check_positive_float
from ..ops import sgd_step, sgd_step_
from .base import (FewShotLearner, _check_label_tensor, _check_shapes, check_episode,
                   check_input_dtype, upcast)
from .functional import BN_MODES, batched_forward

LOSSES = ("cross_entropy", "mse")
Rate = Union[float, list]  # sgd_step's lr: a float or one tensor per adapted parameter
Chunk = Union[int, str, None]  # task_chunk: a size, "auto" or None (all tasks at once)
CPU_TASK_CHUNK = 2  # "auto" task_chunk for convolutional models on CPU (bench/RESULTS.md)

_SECOND, _FIRST, _EVAL = "second", "first", "eval"  # how the inner loop connects to the meta-params


def inner_loop_entry(method: Callable) -> Callable:
    """A public method that runs the inner loop, which needs eager autograd:
    - under ``torch.compile`` it runs eagerly (a graph break): traced, the inner loop's
      ``autograd.grad`` gave no gradients, so the tasks silently did not adapt;
    - under ``torch.inference_mode()`` (Lightning's evaluation) it runs under
      ``torch.no_grad()`` instead, with inference-tensor inputs cloned (they cannot enter
      autograd)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(self, *map(_normal, args), **{k: _normal(v) for k, v in kwargs.items()})
    return torch.compiler.disable(wrapper)


def _normal(a):
    return a.clone() if isinstance(a, Tensor) and a.is_inference() else a


class GradientLearner(FewShotLearner):
    """Shared machinery of the gradient-based learners (not registered itself).

    The whole network ``model`` (kept as ``self.backbone``, also reachable as ``self.model``)
    maps ``[B, *sample]`` to logits ``[B, L]`` (or regression outputs ``[B, *out]`` with
    ``loss="mse"``). A ``ways``-way task uses the first ``ways`` of the ``L >= ways`` logits,
    so one model (trained on up to ``L`` ways, labels permuted per task) serves any smaller
    number of ways. Subclasses choose which parameters adapt and at which rates.
    ``sets_own_grads`` (False here, True for Reptile) tells a training loop whether
    :meth:`loss` fills ``.grad`` itself instead of returning a loss to call ``backward`` on.

    Example:
        >>> from pymeta.learners import LEARNERS
        >>> sorted(n for n, c in LEARNERS.items() if issubclass(c, GradientLearner))
        ['anil', 'fomaml', 'maml', 'metasgd', 'reptile']
        >>> [c.sets_own_grads for c in (MAML, LEARNERS["reptile"])]
        [False, True]
    """

    sets_own_grads = False  # True: loss() fills .grad itself and the engine must not backward

    def __init__(self, model: nn.Module, inner_lr: float, steps: int, test_steps: Optional[int],
                 bn_mode: str, loss: str, per_task: bool,
                 fixed_init: Optional[Sequence[str]] = None) -> None:
        super().__init__(model)
        who = type(self).__name__
        self.fixed_init = _check_prefixes(who, "fixed_init", model, fixed_init or [])
        inner_lr = check_positive_float(who, "inner_lr", inner_lr)
        check_count(who, "steps", steps)
        if test_steps is not None:
            check_count(who, "test_steps", test_steps, low=0)
        if bn_mode not in BN_MODES:
            raise ValueError(f"{who}: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if loss not in LOSSES:
            raise ValueError(f"{who}: loss must be one of {LOSSES}, got {loss!r}")
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{who}: the model has no parameters to adapt")
        self.inner_lr, self.steps = float(inner_lr), int(steps)  # int: numpy ints are not JSON
        self.test_steps = self.steps if test_steps is None else int(test_steps)
        self.bn_mode, self.loss_name = bn_mode, loss
        self.per_task = check_bool(who, "per_task", per_task)
        for n, p in model.named_parameters():  # adapted, never meta-learned; after the checks,
            if _under(n, self.fixed_init):     # so that bad arguments leave the model as it was
                p.requires_grad_(False)

    @property
    def model(self) -> nn.Module:
        return self.backbone

    # ---- public API -------------------------------------------------------------------------

    @inner_loop_entry
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None,
              ways: Optional[int] = None) -> dict[str, Tensor]:
        """Fast weights ``name -> [T, ...]`` of the adapted parameters after ``steps`` inner
        steps (default: the training ``steps``; 0: the meta-parameters, one view per task).
        Connected to the meta-parameters when grad mode is on (second order unless the
        learner is first order); plain tensors otherwise. ``ways``: the inner loss uses the
        first ``ways`` logits of a wider head, as :meth:`forward` does."""
        self._check(support_x, support_y, None, None, ways)
        steps = self.steps if steps is None else check_count(type(self).__name__, "steps",
                                                             steps, low=0)
        mode = self._mode()
        meta = self._meta(mode)
        body, head = self._parts()
        feats = support_x if body is None else self._fwd(body, meta, support_x, self.training)
        return self._inner_loop(meta, head, feats, support_y, steps, mode, self.training, ways)

    @inner_loop_entry
    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                ways: Optional[int], steps: Optional[int] = None) -> Tensor:
        """Query logits ``[T, Q, ways]`` after ``steps`` inner steps on the support set
        (default ``test_steps``; 0 scores the meta-initialisation itself).

        Adapts under ``torch.no_grad()`` too (gradients of the inner loop only, no graph kept).
        With ``loss="mse"``, ``ways`` is ignored and the outputs are ``[T, Q, *out]``.
        """
        self._check(support_x, support_y, query_x, None, ways)
        steps = self.test_steps if steps is None else check_count(type(self).__name__,
                                                                  "steps", steps, low=0)
        return self._chunked(support_x, support_y, query_x, None, steps, self._mode(), ways)[1]

    def embed(self, x: Tensor, batch_dims: int = 1) -> Tensor:
        """Output of the un-adapted network (ANIL on a model it splits: the body's features,
        the head's input; on one it cannot split, the whole model's output) for
        ``x [*batch, *sample]`` with ``batch_dims`` leading batch dims, in one call."""
        if not isinstance(x, Tensor) or x.ndim <= batch_dims:
            raise ValueError(f"{type(self).__name__}.embed: x must be a tensor with "
                             f"{batch_dims} batch dims and a sample shape")
        body, head = self._parts()
        z = (head if body is None else body)(x.reshape(-1, *x.shape[batch_dims:]))
        return z.reshape(*x.shape[:batch_dims], *z.shape[1:])

    def extra_config(self) -> dict:
        cfg = {"inner_lr": self.inner_lr, "steps": self.steps, "test_steps": self.test_steps,
               "bn_mode": self.bn_mode, "loss": self.loss_name, "fixed_init": self.fixed_init}
        return {**cfg, **({"per_task": True} if self.per_task else {})}

    # ---- what subclasses choose -------------------------------------------------------------

    def _adapted_names(self) -> list[str]:
        """Model parameters that adapt in the inner loop (default: all trainable ones and
        the ``fixed_init`` ones)."""
        return [n for n, p in self.model.named_parameters() if self._adapts(n, p)]

    def _adapts(self, name: str, p: Tensor) -> bool:
        return p.requires_grad or _under(name, self.fixed_init)

    def _rate(self, meta: dict[str, Tensor], step: int) -> Rate:
        """Inner learning rate(s) of inner step ``step`` (0-based)."""
        return self.inner_lr

    def _check_rates(self, rate: Rate, base: list[Tensor]) -> None:
        """Learned rates are sized and typed at construction: name a later change."""
        who = type(self).__name__
        if not isinstance(rate, list):
            return
        if len(rate) != len(base):
            raise ValueError(f"{who}: {len(rate)} learned inner rates for {len(base)} adapting "
                             f"parameters: which parameters require grad changed after the "
                             f"learner was built; build it again")
        if rate and rate[0].dtype != base[0].dtype:
            raise TypeError(f"{who}: the learned inner rates are {rate[0].dtype} but the "
                            f"parameters {base[0].dtype}: convert the whole learner "
                            f"(learner.to(dtype)), not only its model")

    def _split(self) -> Optional[int]:
        """Index of the first top-level child of the head when the model splits into a body
        that runs once and a head that adapts (ANIL); None: the whole model runs each step."""
        return None

    # ---- the inner loop ---------------------------------------------------------------------

    def _mode(self) -> str:
        return _EVAL if not torch.is_grad_enabled() else _SECOND

    def _meta(self, mode: str) -> dict[str, Tensor]:
        """Meta-parameters by name (``backbone.*`` the model's), detached for ``eval``."""
        meta = dict(self.named_parameters())
        return {n: p.detach() for n, p in meta.items()} if mode == _EVAL else meta

    def _parts(self) -> tuple[Optional[nn.Module], nn.Module]:
        """(body or None, head): views of the model's top-level children with their names."""
        k = self._split()
        if k is None:
            return None, self.model
        children = list(self.model._modules.items())  # a reused module at each of its uses
        return nn.Sequential(OrderedDict(children[:k])), nn.Sequential(OrderedDict(children[k:]))

    def _fwd(self, module: nn.Module, meta: dict[str, Tensor], x: Tensor, update_stats: bool,
             fast: Optional[dict[str, Tensor]] = None) -> Tensor:
        """``module`` (the model or a part of it) on ``x [T, B, ...]``: fast weights where
        given, else the meta-parameters (``backbone.<name>`` in ``meta``)."""
        fast = fast or {}
        params = {n: fast[n] if n in fast else meta["backbone." + n]
                  for n, _ in module.named_parameters()}
        return batched_forward(module, params, None, x, bn_mode=self.bn_mode,
                               training=self.training, update_stats=update_stats,
                               per_task=self.per_task)

    def _inner_loop(self, meta: dict[str, Tensor], head: nn.Module, x: Tensor, y: Tensor,
                    steps: int, mode: str, update_stats: bool,
                    ways: Optional[int]) -> dict[str, Tensor]:
        fast = {n: meta["backbone." + n] for n in self._adapted_names()}
        if not fast:
            raise ValueError(f"{type(self).__name__}: no parameter adapts: every parameter it "
                             f"would adapt is frozen (requires_grad=False)")
        self._check_rates(self._rate(meta, 0), list(fast.values()))  # once, not every step
        if steps == 0:  # the meta-parameters themselves, task-stacked like adapted ones
            return {n: p.expand(x.shape[0], *p.shape) for n, p in fast.items()}
        for s in range(steps):  # after step 0 the fast weights are ours: eval may update in place
            fast = self._step(meta, head, fast, x, y, s, mode, update_stats, ways, own=s > 0)
        return fast

    def _step(self, meta: dict[str, Tensor], head: nn.Module, fast: dict[str, Tensor],
              x: Tensor, y: Tensor, s: int, mode: str, update_stats: bool,
              ways: Optional[int], own: bool = False) -> dict[str, Tensor]:
        """One inner step on all tasks: per-task support gradients, then one fused update.
        ``own``: the fast weights are this loop's own tensors (eval then updates in place)."""
        names, base = list(fast), list(fast.values())
        T = x.shape[0]
        shared = [p.dim() == meta["backbone." + n].dim() for n, p in fast.items()]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() if mode == _EVAL or not p.requires_grad
                      else p for p in base]
            inputs = [p.expand(T, *p.shape) if sh else p for p, sh in zip(leaves, shared)]
            out = self._fwd(head, meta, x, update_stats, dict(zip(names, inputs)))
            # sum: task t's grad is its own loss's; labels checked at their first use only
            loss = self._task_losses(out, y, ways, check_labels=s == 0).sum()
            grads = torch.autograd.grad(loss, inputs, create_graph=mode == _SECOND,
                                        allow_unused=True)
        # Weights the loss does not reach keep their value, outside the step: a zero gradient
        # through sgd_step would give their meta-parameters a zero .grad instead of None,
        # which weight decay and momentum then act on.
        used = [i for i, g in enumerate(grads) if g is not None]
        rate = self._rate(meta, s)
        step_args = ([base[i] for i in used], [grads[i] for i in used],
                     [rate[i] for i in used] if isinstance(rate, list) else rate)
        if mode != _EVAL:
            stepped = iter(sgd_step(*step_args))
        else:
            with torch.no_grad():
                inplace = own and not any(shared)
                stepped = iter((sgd_step_ if inplace else sgd_step)(*step_args))
        return {n: next(stepped) if g is not None else p.expand(T, *p.shape) if sh else p
                for n, p, g, sh in zip(names, base, grads, shared)}

    def _episode(self, meta: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor,
                 qy: Optional[Tensor], steps: int, mode: str, update_stats: bool,
                 ways: Optional[int]) -> tuple[Optional[Tensor], Tensor]:
        """(mean query loss over tasks or None, query outputs) for one batch of tasks."""
        body, head = self._parts()
        if body is not None:  # ANIL: the body runs once, outside the inner loop
            sx = self._fwd(body, meta, sx, update_stats)
            qx = self._fwd(body, meta, qx, update_stats)
        fast = self._inner_loop(meta, head, sx, sy, steps, mode, update_stats, ways)
        out = self._checked(self._fwd(head, meta, qx, update_stats, fast), ways)
        return None if qy is None else self._task_losses(out, qy, ways).mean(), out

    def _chunked(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Optional[Tensor], steps: int,
                 mode: str, ways: Optional[int]) -> tuple[Optional[Tensor], Tensor]:
        """:meth:`_episode` over the whole meta-batch (subclasses may split it)."""
        return self._episode(self._meta(mode), sx, sy, qx, qy, steps, mode, self.training, ways)

    # ---- losses and checks ------------------------------------------------------------------

    def _task_losses(self, out: Tensor, y: Tensor, ways: Optional[int],
                     check_labels: bool = True) -> Tensor:
        """Per-task mean loss ``[T]`` of outputs ``[T, N, ...]``. Without ``ways`` the labels
        were not checked against the model, and ``check_labels`` does that (a host sync)."""
        out = upcast(self._checked(out, ways))
        T = out.shape[0]
        if self.loss_name == "mse":
            if out.shape != y.shape:
                raise ValueError(f"{type(self).__name__}: the model outputs "
                                 f"{list(out.shape[2:])} per sample but the targets are "
                                 f"{list(y.shape[2:])}")
            return F.mse_loss(out, y.to(out.dtype), reduction="none").reshape(T, -1).mean(1)
        if ways is None and check_labels:  # on CUDA an out-of-range label is a device assert
            L = out.shape[-1]
            if ((y < 0) | (y >= L)).any():
                raise ValueError(f"{type(self).__name__}: labels must lie in [0, {L}) for a "
                                 f"model with {L} outputs, got values from {int(y.min())} to "
                                 f"{int(y.max())}")
        return F.cross_entropy(out.flatten(0, 1), y.flatten().long(),
                               reduction="none").view(T, -1).mean(1)

    def _checked(self, out: Tensor, ways: Optional[int]) -> Tensor:
        """The first ``ways`` logits: a model with a wider head serves tasks of fewer ways."""
        if self.loss_name != "cross_entropy" or ways is None:
            return out
        if out.ndim != 3 or out.shape[-1] < ways:
            more = (f"; its head has {out.shape[-1]} outputs: train with at least {ways} ways "
                    f"(pymeta train --eval-ways) to test {ways}-way tasks"
                    if out.ndim == 3 else "")
            raise ValueError(f"{type(self).__name__}: the model must output [B, ways] logits "
                             f"(or more); got {list(out.shape[2:])} per sample for "
                             f"ways={ways}{more}")
        return out if out.shape[-1] == ways else out[..., :ways]

    def _check(self, sx: Tensor, sy: Tensor, qx: Optional[Tensor], qy: Optional[Tensor],
               ways: Optional[int]) -> None:
        who = type(self).__name__
        qx_ = sx if qx is None else qx
        if self.loss_name == "cross_entropy" and ways is not None:
            check_episode(who, sx, sy, qx_, ways, qy)
            check_input_dtype(who, sx, self.model)
            return
        for name, t in (("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
            if t is not None and not isinstance(t, Tensor):
                raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        T, S, Q = _check_shapes(who, sx, qx_)
        check_input_dtype(who, sx, self.model)
        for name, y, n in (("support_y", sy, S), ("query_y", qy, Q)):
            if y is None:
                continue
            if self.loss_name == "cross_entropy":
                _check_label_tensor(who, name, y, (T, n), sx.device)
            elif not y.is_floating_point() or y.ndim < 2 or tuple(y.shape[:2]) != (T, n):
                raise ValueError(f"{who}: with loss='mse', {name} must be float targets "
                                 f"[T, {n}, *out] = [{T}, {n}, ...], got {y.dtype} "
                                 f"{list(y.shape)}")
            elif y.device != sx.device:
                raise ValueError(f"{who}: {name} is on {y.device} but the inputs are on "
                                 f"{sx.device}")


class MAML(GradientLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), batched over tasks.

    Each task adapts the whole network with ``steps`` SGD steps on its support loss; the meta-
    loss is the mean query loss of the adapted networks, differentiated through the inner loop
    (second order) or not (``second_order=False``, see :class:`FOMAML`).

    Args:
        model: the whole network, ``[B, *sample]`` -> ``[B, ways]`` logits (``[B, *out]``
            outputs with ``loss="mse"``).
        inner_lr: inner-loop learning rate (the initial per-step rates with ``lslr``).
        steps: inner steps in training (:meth:`loss`, :meth:`meta_loss`, :meth:`adapt`).
        test_steps: inner steps in :meth:`forward` (evaluation); default ``steps``.
        second_order: differentiate through the inner gradients (``create_graph=True``).
        lslr: MAML++ learned rates, one per inner step and parameter tensor (a
            ``[steps, n_params]`` parameter ``lslr_rates``); test steps beyond ``steps`` reuse the
            last step's rates.
        bn_mode: BatchNorm in eval: ``"transductive"`` (per-task batch statistics, as in
            MAML) or ``"running"`` (running statistics). Training uses per-task batch
            statistics and updates the running ones with the mean over tasks; a BatchNorm
            left in eval mode (frozen) keeps its running statistics and is not updated.
        task_chunk: tasks processed together. Each chunk's meta-gradient is taken as soon
            as its loss is computed (inside :meth:`meta_loss`), so only one chunk's graph is
            alive at a time and nothing is recomputed; the loss then backpropagates once (no
            double backward through it), and :meth:`loss` returns detached logits. ``None``:
            the whole meta-batch at once. ``"auto"`` (default): chunks of
            ``CPU_TASK_CHUNK`` (2) tasks for convolutional models on CPU, the whole
            meta-batch otherwise. Conv4-64 + BatchNorm, 5-way 1-shot 15-query, 32 tasks, one
            second-order step on a 2-vCPU machine (bench/RESULTS.md): chunks of 2 run 1.4x
            as fast as ``higher`` at 260 MiB of peak memory, all 32 tasks at once 0.9x at
            2.2 GiB. Small models (the sinusoid MLP) and GPUs gain from batching.
        checkpoint_inner: rebuild each inner step in backward instead of keeping its graph,
            so memory grows slowly with ``steps`` (second order only).
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression: float targets
            ``[T, N, *out]``; ``ways`` is ignored).
        per_task: force the per-task loop instead of the batched forward (testing).
        fixed_init: parameter-name prefixes of parameters that every task adapts from their
            current value but that are never meta-learned (set ``requires_grad=False``), e.g.
            a zero-initialised classifier head: Kao et al. (2022)'s zeroing trick, which also
            makes a model trained on N-way tasks fit for any number of ways.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pymeta.nn import Conv4
        >>> model = nn.Sequential(Conv4(hidden=8, out_channels=8), nn.Linear(8, 3))
        >>> learner = MAML(model, inner_lr=0.4, steps=2, test_steps=3)
        >>> sx, qx = torch.randn(4, 6, 1, 28, 28), torch.randn(4, 9, 1, 28, 28)  # 4 tasks
        >>> sy, qy = torch.arange(3).repeat(2).expand(4, 6), torch.arange(3).repeat(3).expand(4, 9)
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=3)
        >>> loss.backward()                                   # meta-gradients in .grad
        >>> with torch.no_grad():                             # evaluation still adapts
        ...     learner(sx, sy, qx, ways=3).shape
        torch.Size([4, 9, 3])
        >>> learner.adapt(sx, sy)["1.weight"].shape           # per-task fast weights
        torch.Size([4, 3, 8])
    """

    algo = "maml"

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, steps: int = 1,
                 test_steps: Optional[int] = None, second_order: bool = True,
                 lslr: bool = False, bn_mode: str = "transductive",
                 task_chunk: Chunk = "auto", checkpoint_inner: bool = False,
                 loss: str = "cross_entropy", per_task: bool = False,
                 fixed_init: Optional[Sequence[str]] = None) -> None:
        who = type(self).__name__  # every check before the base class freezes fixed_init
        if task_chunk not in (None, "auto"):
            check_count(who, "task_chunk", task_chunk, ", 'auto' or None")
        flags = [check_bool(who, name, value) for name, value in (
            ("second_order", second_order), ("checkpoint_inner", checkpoint_inner), ("lslr", lslr))]
        super().__init__(model, inner_lr, steps, test_steps, bn_mode, loss, per_task, fixed_init)
        self.second_order, self.checkpoint_inner, self.lslr = flags
        self.task_chunk = task_chunk if task_chunk in (None, "auto") else int(task_chunk)
        self._convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
        if self.lslr:
            n = len(self._adapted_names())
            like = next(iter(model.parameters()))
            self.lslr_rates = nn.Parameter(torch.full((steps, n), self.inner_lr,
                                                      dtype=like.dtype, device=like.device))

    @inner_loop_entry
    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, ways: Optional[int] = None) -> Tensor:
        """Mean query loss over tasks after ``steps`` inner steps, differentiable to the
        meta-parameters. ``ways``, when given, enables the full label checks and scores only
        the first ``ways`` logits of a wider head (as :meth:`forward` and :meth:`loss` do)."""
        self._check(support_x, support_y, query_x, query_y, ways)
        return self._chunked(support_x, support_y, query_x, query_y, self.steps, self._mode(),
                             ways)[0]

    @inner_loop_entry
    def loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             ways: int) -> tuple[Tensor, Tensor]:
        """(:meth:`meta_loss`, query logits ``[T, Q, ways]`` after the training steps; the
        logits are detached when ``task_chunk`` splits the meta-batch)."""
        self._check(support_x, support_y, query_x, query_y, ways)
        return self._chunked(support_x, support_y, query_x, query_y, self.steps, self._mode(),
                             ways)

    def extra_config(self) -> dict:
        cfg = {"second_order": self.second_order, "lslr": self.lslr,
               "task_chunk": self.task_chunk, "checkpoint_inner": self.checkpoint_inner}
        return {**super().extra_config(), **cfg}

    # ---- internals --------------------------------------------------------------------------

    def _mode(self) -> str:
        if not torch.is_grad_enabled():
            return _EVAL
        return _SECOND if self.second_order else _FIRST

    def _rate(self, meta: dict[str, Tensor], step: int) -> Rate:
        if not self.lslr:
            return self.inner_lr
        rates = meta["lslr_rates"]
        row = rates[min(step, rates.shape[0] - 1)]  # test steps beyond training: the last rates
        return list(row.unbind())

    def _step(self, meta: dict[str, Tensor], head: nn.Module, fast: dict[str, Tensor],
              x: Tensor, y: Tensor, s: int, mode: str, update_stats: bool,
              ways: Optional[int], own: bool = False) -> dict[str, Tensor]:
        if not (self.checkpoint_inner and mode == _SECOND):
            return super()._step(meta, head, fast, x, y, s, mode, update_stats, ways, own)
        return self._checkpointed_step(meta, head, fast, x, y, s, update_stats, ways)

    def _checkpointed_step(self, meta: dict[str, Tensor], head: nn.Module,
                           fast: dict[str, Tensor], x: Tensor, y: Tensor, s: int,
                           update_stats: bool, ways: Optional[int]) -> dict[str, Tensor]:
        """An inner step whose graph is rebuilt in backward: only its inputs are kept."""
        names = list(meta)  # every tensor the step reads goes in, so gradients reach them all
        fast_names = list(fast)
        step = super()._step

        def run(tensors: Sequence[Tensor], record: bool) -> tuple[Tensor, ...]:
            m = dict(zip(names, tensors[:len(names)]))
            f = dict(zip(fast_names, tensors[len(names):-1]))
            out = step(m, head, f, tensors[-1], y, s, _SECOND if record else _EVAL,
                       update_stats and not record, ways)
            return tuple(out.values())

        outs = _Recompute.apply(run, len(fast_names), *meta.values(), *fast.values(), x)
        return dict(zip(fast_names, outs))

    def _chunked(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Optional[Tensor], steps: int,
                 mode: str, ways: Optional[int]) -> tuple[Optional[Tensor], Tensor]:
        T = sx.shape[0]
        c = self._chunk_size(sx)
        if c >= T:
            return super()._chunked(sx, sy, qx, qy, steps, mode, ways)
        meta = self._meta(mode)
        starts = _chunk_starts(self.model if self.training else None, T, c)
        if mode == _EVAL or qy is None:  # no meta-gradient wanted: chunks just run in turn
            runs = [self._episode(meta, *_rows(lo, c, sx, sy, qx, qy), steps, mode,
                                  self.training, ways) for lo in starts]
            loss = None if qy is None else sum(l * (o.shape[0] / T) for l, o in runs)
            return loss, torch.cat([o for _, o in runs])
        names = list(meta)

        def chunks(tensors: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
            m, data = dict(zip(names, tensors)), tensors[len(names):]
            for lo in starts:
                part = _rows(lo, c, *data)
                loss, out = self._episode(m, *part, steps, mode, self.training, ways)
                yield loss * (part[0].shape[0] / T), out

        return _EagerChunks.apply(chunks, *meta.values(), sx, sy, qx, qy)

    def _chunk_size(self, x: Tensor) -> int:
        if self.task_chunk != "auto":
            return self.task_chunk or x.shape[0]
        return CPU_TASK_CHUNK if self._convolutional and x.device.type == "cpu" else x.shape[0]


class FOMAML(MAML):
    """First-order MAML: no second derivatives; the meta-gradient is each task's query
    gradient at its adapted weights, summed into the shared meta-parameters (averaged over
    tasks through the mean loss). Same arguments as :class:`MAML` without ``second_order``
    and ``checkpoint_inner``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> learner = FOMAML(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                  steps=3)
        >>> sx, qx = torch.randn(8, 4, 4), torch.randn(8, 6, 4)
        >>> sy, qy = torch.tensor([0, 1, 0, 1]).expand(8, 4), torch.randint(0, 2, (8, 6))
        >>> learner.meta_loss(sx, sy, qx, qy).backward()
    """

    algo = "fomaml"

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, steps: int = 1,
                 test_steps: Optional[int] = None, lslr: bool = False,
                 bn_mode: str = "transductive", task_chunk: Chunk = "auto",
                 loss: str = "cross_entropy", per_task: bool = False,
                 fixed_init: Optional[Sequence[str]] = None) -> None:
        super().__init__(model, inner_lr, steps, test_steps, second_order=False, lslr=lslr,
                         bn_mode=bn_mode, task_chunk=task_chunk, loss=loss, per_task=per_task,
                         fixed_init=fixed_init)

    def extra_config(self) -> dict:
        cfg = super().extra_config()
        del cfg["second_order"], cfg["checkpoint_inner"]
        return cfg


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): every parameter element has its own learned inner rate.

    The rates (``rates.i``, one tensor shaped like each adapted parameter, initialised to
    ``inner_lr``) are meta-parameters: the meta-gradient reaches them through the inner steps.
    Same arguments as :class:`MAML` without ``lslr``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> learner = MetaSGD(nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)),
        ...                   inner_lr=0.01, loss="mse")               # sine regression
        >>> sx, qx = torch.rand(5, 10, 1), torch.rand(5, 10, 1)
        >>> loss = learner.meta_loss(sx, sx.sin(), qx, qx.sin())
        >>> loss.backward()
        >>> learner.rates[0].grad.shape
        torch.Size([32, 1])
    """

    algo = "metasgd"

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, steps: int = 1,
                 test_steps: Optional[int] = None, second_order: bool = True,
                 bn_mode: str = "transductive", task_chunk: Chunk = "auto",
                 checkpoint_inner: bool = False, loss: str = "cross_entropy",
                 per_task: bool = False, fixed_init: Optional[Sequence[str]] = None) -> None:
        super().__init__(model, inner_lr, steps, test_steps, second_order, False, bn_mode,
                         task_chunk, checkpoint_inner, loss, per_task, fixed_init)
        params = dict(model.named_parameters())
        self.rates = nn.ParameterList([nn.Parameter(torch.full_like(params[n], self.inner_lr))
                                       for n in self._adapted_names()])

    def _rate(self, meta: dict[str, Tensor], step: int) -> Rate:
        return [meta[f"rates.{i}"] for i in range(len(self.rates))]

    def extra_config(self) -> dict:
        cfg = super().extra_config()
        del cfg["lslr"]
        return cfg


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): only the head adapts.

    The body (everything but the head) is meta-learned in the outer loop only. When the model
    is an ``nn.Sequential`` whose trailing children hold exactly the head's parameters, the
    body runs once per meta-batch (support and query) outside the inner loop; otherwise the
    whole model runs each inner step with the body's weights shared (the same losses and
    gradients, slower; the body's BatchNorm running statistics then take one update per step).

    Args:
        head: parameter-name prefixes of the head (e.g. ``["1"]`` or ``["head.fc"]``);
            default: the last ``nn.Linear`` in the model.
        others: as :class:`MAML`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pymeta.nn import Conv4
        >>> learner = ANIL(nn.Sequential(Conv4(hidden=8, out_channels=8), nn.Linear(8, 5)),
        ...                steps=5)
        >>> learner.head
        ['1']
        >>> sx, qx = torch.randn(2, 5, 1, 28, 28), torch.randn(2, 10, 1, 28, 28)
        >>> sy, qy = torch.arange(5).expand(2, 5), torch.arange(5).repeat(2).expand(2, 10)
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=5)
        >>> learner.embed(sx, batch_dims=2).shape            # the body's features
        torch.Size([2, 5, 8])
    """

    algo = "anil"

    def __init__(self, model: nn.Module, head: Optional[Sequence[str]] = None,
                 inner_lr: float = 0.4, steps: int = 1, test_steps: Optional[int] = None,
                 second_order: bool = True, lslr: bool = False, bn_mode: str = "transductive",
                 task_chunk: Chunk = "auto", checkpoint_inner: bool = False,
                 loss: str = "cross_entropy", per_task: bool = False,
                 fixed_init: Optional[Sequence[str]] = None) -> None:
        self.head = _head_prefixes(model, head)  # before MAML counts the adapted parameters
        fixed = _check_prefixes("ANIL", "fixed_init", model, fixed_init or [])
        outside = [n for n, _ in model.named_parameters()
                   if _under(n, fixed) and not _under(n, self.head)]
        if outside:  # never adapted (not head) nor meta-learned (fixed): frozen at init
            raise ValueError(f"ANIL: fixed_init parameters adapt from a fixed value, so they "
                             f"must lie in the head {self.head}; {outside[0]!r} does not. "
                             f"Add its prefix to head, or leave it out of fixed_init")
        super().__init__(model, inner_lr, steps, test_steps, second_order, lslr, bn_mode,
                         task_chunk, checkpoint_inner, loss, per_task, fixed_init)

    def _adapts(self, name: str, p: Tensor) -> bool:
        return super()._adapts(name, p) and _under(name, self.head)

    def _split(self) -> Optional[int]:
        model = self.model
        if type(model) is not nn.Sequential or _shares_parameters(model):
            return None
        children = list(model._modules.items())
        for k, (name, _) in enumerate(children):
            tail = [f"{c}.{n}" for c, m in children[k:] for n, _ in m.named_parameters()]
            if tail and all(_under(n, self.head) for n in tail):
                heads = [n for n, _ in model.named_parameters() if _under(n, self.head)]
                return k if len(heads) == len(tail) else None
        return None

    def extra_config(self) -> dict:
        return {"head": list(self.head), **super().extra_config()}


# ---- helpers --------------------------------------------------------------------------------

def _shares_parameters(model: nn.Module) -> bool:
    """Whether a parameter has several names (tied weights, a module used twice)."""
    return (sum(1 for _ in model.named_parameters(remove_duplicate=False))
            != sum(1 for _ in model.parameters()))


class _EagerChunks(torch.autograd.Function):
    """The sum of the losses that ``chunks(tensors)`` yields, one ``(loss, output)`` per task
    chunk. Each chunk's loss is differentiated as soon as it is computed, so only one chunk's
    graph is ever alive and nothing is recomputed (what a per-task ``backward()`` loop does,
    behind a loss that ``backward`` as usual). Backward scales the summed gradients by the
    incoming one; the outputs come back concatenated and detached. Once differentiable."""

    @staticmethod
    def forward(ctx, chunks: Callable, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        inputs = [t.detach().requires_grad_(n) for t, n in zip(tensors, ctx.needs_input_grad[1:])]
        wanted = [i for i in inputs if i.requires_grad]
        sums: list[Optional[Tensor]] = [None] * len(wanted)
        total, outs = None, []
        with torch.enable_grad():
            for loss, out in chunks(inputs):
                if wanted and loss.requires_grad:
                    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
                    sums = [a if g is None else g if a is None else a + g
                            for a, g in zip(sums, grads)]
                total = loss.detach() if total is None else total + loss.detach()
                outs.append(out.detach())
        ctx.sums = sums
        out = torch.cat(outs)
        ctx.mark_non_differentiable(out)
        return total, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_out: Tensor):
        sums = iter(ctx.sums)  # one per input that needs grad, in order
        grads = [next(sums) if n else None for n in ctx.needs_input_grad[1:]]
        return (None, *(None if g is None else g * grad_loss for g in grads))


def _chunk_starts(model: Optional[nn.Module], T: int, c: int) -> Iterator[int]:
    """First task of each chunk of ``c`` tasks. With ``model`` (training), the BatchNorm
    running statistics come out as one whole-batch run leaves them: every chunk starts from
    the statistics before the meta-batch, and the result is the task-weighted mean of the
    chunks' results. The updates are linear in the batch statistics, so this is exact;
    without it ``task_chunk`` would change what ``bn_mode="running"`` evaluates with."""
    buffers = [] if model is None else [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    start = [b.clone() for b in buffers]
    mean = [torch.zeros_like(b) if b.is_floating_point() else None for b in buffers]
    for lo in range(0, T, c):
        with torch.no_grad():
            for b, s in zip(buffers, start):
                b.copy_(s)
        yield lo  # the caller runs the chunk
        with torch.no_grad():
            for b, m in zip(buffers, mean):
                if m is not None:
                    m.add_(b, alpha=min(c, T - lo) / T)
    with torch.no_grad():
        for b, m in zip(buffers, mean):
            if m is not None:
                b.copy_(m)


def _rows(lo: int, n: int, *tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Tasks ``lo .. lo + n - 1`` of each task-batched tensor (None stays None)."""
    return [None if t is None else t[lo:lo + n] for t in tensors]


class _Recompute(torch.autograd.Function):
    """Runs ``run(tensors, record=False)`` for the outputs' values only (no graph kept) and
    ``run(tensors, record=True)`` again in backward to differentiate it. The first ``n_diff``
    outputs are differentiable; RNG state is replayed so dropout draws the same masks."""

    @staticmethod
    def forward(ctx, run: Callable, n_diff: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.run, ctx.n_diff = run, n_diff
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.rng = _rng_state(tensors)
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            outs = run([t.detach() for t in tensors], False)
        outs = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*outs[n_diff:])
        return outs

    @staticmethod
    def backward(ctx, *gos: Tensor):
        need = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
        with torch.enable_grad(), _replayed_rng(ctx.rng):
            outs = ctx.run(inputs, True)[:ctx.n_diff]
        pairs = [(o, g) for o, g in zip(outs, gos) if g is not None and o.requires_grad]
        wanted = [i for i in inputs if i.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True) if pairs and wanted
                     else [None] * len(wanted))
        return (None, None, *(next(grads) if n else None for n in need))


def _rng_state(tensors: Sequence[Tensor]) -> tuple:
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    return (torch.get_rng_state(), devices,
            [torch.cuda.get_rng_state(d) for d in devices])


class _replayed_rng:
    """Context: the RNG state saved by :func:`_rng_state`, the caller's restored after."""

    def __init__(self, state: tuple) -> None:
        self.cpu, self.devices, self.cuda = state

    def __enter__(self) -> None:
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc) -> None:
        self.fork.__exit__(*exc)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_prefixes(who: str, what: str, model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """``prefixes`` as a list, each naming at least one parameter of ``model``."""
    if isinstance(prefixes, str) or not all(isinstance(h, str) for h in prefixes):
        raise ValueError(f"{who}: {what} must be a list of parameter-name prefixes, got "
                         f"{prefixes!r}")
    names = [n for n, _ in model.named_parameters()]
    for h in prefixes:
        if not any(_under(n, [h]) for n in names):
            raise ValueError(f"{who}: no model parameter is named {h!r} or {h + '.*'!r}; "
                             f"parameters: {names}")
    return list(prefixes)


def _head_prefixes(model: nn.Module, head: Optional[Sequence[str]]) -> list[str]:
    """The head's parameter-name prefixes: given (and checked), or the last nn.Linear's."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"ANIL: model must be an nn.Module, got {type(model).__name__}")
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("ANIL: the model has no nn.Linear to adapt; name the head's "
                             "parameters with head=[prefix, ...]")
        return [linears[-1]]
    if not head:
        raise ValueError(f"ANIL: head must be a list of parameter-name prefixes, got {head!r}")
    head = _check_prefixes("ANIL", "head", model, head)
    if all(_under(n, head) for n, _ in model.named_parameters()):
        raise ValueError("ANIL: the head covers every parameter; use MAML to adapt them all")
    return head


__all__ = ["GradientLearner", "MAML", "FOMAML", "MetaSGD", "ANIL", "LOSSES"]
