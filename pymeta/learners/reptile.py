"""Reptile (Nichol et al. 2018), batched over tasks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import sgd_step
from .maml import _EVAL, GradientLearner, inner_loop_entry


class Reptile(GradientLearner):
    """Reptile: ``steps`` plain SGD steps per task on its support set (first order, all tasks
    at once), then ``theta <- theta + epsilon * (mean_t adapted_t - theta)``.

    :meth:`loss` returns the query loss of the adapted weights (a detached scalar, for
    logging) and the query logits, and accumulates the pseudo-gradient
    ``theta - mean_t adapted_t`` into each meta-parameter's ``.grad`` (as ``backward`` would;
    all tensors in one fused :func:`pymeta.ops.sgd_step` call). So a plain
    ``torch.optim.SGD(lr=epsilon)`` step after it (torch's multi-tensor step) is exactly
    Reptile's outer update, and any other optimizer (Adam, as in the paper's few-shot runs)
    applies to the same direction. ``sets_own_grads = True`` tells the training engine not to call
    ``backward`` on the loss.

    Args:
        model: the whole network, ``[B, *sample]`` -> ``[B, ways]`` logits (``[B, *out]``
            outputs with ``loss="mse"``).
        inner_lr: inner SGD learning rate.
        steps: inner steps on the support set in training.
        test_steps: inner steps in :meth:`forward` (evaluation); default ``steps``.
        bn_mode, loss, per_task, fixed_init: as in :class:`pymeta.learners.MAML`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> learner = Reptile(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
        ...                   inner_lr=0.1, steps=5)
        >>> opt = torch.optim.SGD(learner.parameters(), lr=0.5)     # epsilon = 0.5
        >>> sx, qx = torch.randn(8, 6, 4), torch.randn(8, 9, 4)
        >>> sy, qy = torch.arange(3).repeat(2).expand(8, 6), torch.randint(0, 3, (8, 9))
        >>> opt.zero_grad()
        >>> loss, logits = learner.loss(sx, sy, qx, qy, ways=3)   # fills .grad; no backward
        >>> opt.step()
        >>> logits.shape
        torch.Size([8, 9, 3])
    """

    algo = "reptile"
    sets_own_grads = True

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, steps: int = 5,
                 test_steps: Optional[int] = None, bn_mode: str = "transductive",
                 loss: str = "cross_entropy", per_task: bool = False,
                 fixed_init: Optional[Sequence[str]] = None) -> None:
        super().__init__(model, inner_lr, steps, test_steps, bn_mode, loss, per_task, fixed_init)

    @inner_loop_entry
    def loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             ways: int) -> tuple[Tensor, Tensor]:
        """(Detached mean query loss of the adapted weights, query logits); accumulates
        ``theta - mean_t adapted_t`` into ``.grad`` of every adapted meta-parameter."""
        self._check(support_x, support_y, query_x, query_y, ways)
        meta = self._meta(_EVAL)
        fast = self._inner_loop(meta, self.model, support_x, support_y, self.steps, _EVAL,
                                self.training, ways)
        with torch.no_grad():
            out = self._checked(self._fwd(self.model, meta, query_x, False, fast), ways)
            loss = self._task_losses(out, query_y, ways).mean()
            params = dict(self.model.named_parameters())
            # fixed_init ones are never meta-learned; one the support loss never reached is
            # still the meta-parameter, expanded over tasks: no .grad (as MAML), not a zero
            # one that weight decay and momentum would act on
            learned = [(params[n], w) for n, w in fast.items() if params[n].requires_grad
                       and not (w.stride(0) == 0 and w.data_ptr() == params[n].data_ptr())]
            # theta - mean_t adapted_t for every tensor in one fused call: sgd_step(p, m, 1)
            steps = sgd_step([p.detach() for p, _ in learned], [w.mean(0) for _, w in learned],
                             1.0)
            for (p, _), step in zip(learned, steps):
                p.grad = step if p.grad is None else p.grad + step
        return loss, out

    def _mode(self) -> str:
        return _EVAL  # first order throughout: no graph to the meta-parameters


__all__ = ["Reptile"]
