"""The interface every few-shot learner implements, and the episode checks they share.

An episode is a batch of ``T`` tasks: ``support_x [T, S, *sample]`` with labels
``support_y [T, S]`` in ``0..ways-1`` (any order, uneven shots, every class present) and
``query_x [T, Q, *sample]``. Learners embed support and query in one backbone call and turn
the embeddings into logits ``[T, Q, ways]`` with batched tensor ops (no per-task loops).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)
TOKEN_DTYPES = (torch.int64, torch.int32)  # inputs an nn.Embedding takes: text episodes


class FewShotLearner(nn.Module):
    """Base class: a backbone plus a head that classifies queries from a labelled support set.

    Subclasses set :attr:`algo` (their registry name) and implement :meth:`_logits` (and
    :meth:`_loss` when the loss is not cross entropy on the logits).

    Example:
        >>> import torch
        >>> from pymeta.learners import ProtoNet
        >>> learner = ProtoNet(torch.nn.Flatten())          # any module embeds
        >>> learner.embed(torch.randn(2, 3, 1, 2, 2)).shape  # [..., C, H, W] -> [..., D]
        torch.Size([2, 3, 4])
    """

    algo: str = ""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"{type(self).__name__}: backbone must be an nn.Module, "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone

    # ---- the interface ------------------------------------------------------------------

    def embed(self, x: Tensor, batch_dims: int | None = None) -> Tensor:
        """Embeds ``x [*batch, *sample]`` to ``[*batch, *feature]`` in one backbone call.
        ``batch_dims`` leading dims are batch dims; by default all but an image's three
        ``[C, H, W]`` (pass it for samples of another rank, such as vectors)."""
        if batch_dims is None:
            batch_dims = x.ndim - 3
        if not isinstance(batch_dims, int) or batch_dims < 0 or x.ndim <= batch_dims:
            raise ValueError(f"{type(self).__name__}.embed: x {list(x.shape)} needs "
                             f"{batch_dims} batch dims and a sample shape (images: "
                             f"[..., C, H, W]; otherwise pass batch_dims)")
        return self._embed(x, batch_dims)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                ways: int) -> Tensor:
        """Logits ``[T, Q, ways]`` (higher = more likely) for each query of each task."""
        self._check_episode(support_x, support_y, query_x, ways)
        zs, zq = self._embed_episode(support_x, query_x)
        return self._logits(zs, support_y.long(), zq, ways)

    def loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
             ways: int) -> tuple[Tensor, Tensor]:
        """(Scalar training loss averaged over tasks and queries, logits ``[T, Q, ways]``)."""
        self._check_episode(support_x, support_y, query_x, ways, query_y)
        zs, zq = self._embed_episode(support_x, query_x)
        logits = self._logits(zs, support_y.long(), zq, ways)
        return self._loss(logits, query_y.long(), ways), logits

    def extra_config(self) -> dict:
        """JSON-serialisable constructor kwargs (all but the backbone) to rebuild the learner."""
        return {}

    # ---- for subclasses -----------------------------------------------------------------

    def _logits(self, zs: Tensor, support_y: Tensor, zq: Tensor, ways: int) -> Tensor:
        """Embeddings ``[T, S, *f]``, int64 labels ``[T, S]``, ``[T, Q, *f]`` -> logits."""
        raise NotImplementedError

    def _loss(self, logits: Tensor, query_y: Tensor, ways: int) -> Tensor:
        return F.cross_entropy(upcast(logits.flatten(0, 1)), query_y.flatten())

    def _embed(self, x: Tensor, lead: int) -> Tensor:
        """Backbone on ``x`` with its first ``lead`` dims flattened into one batch."""
        z = self.backbone(x.reshape(-1, *x.shape[lead:]))
        return z.reshape(*x.shape[:lead], *z.shape[1:])

    def _embed_episode(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        # One call: BatchNorm sees the whole episode, and small backbones launch once.
        z = self._embed(torch.cat([support_x, query_x], 1), 2)
        return z[:, :support_x.shape[1]], z[:, support_x.shape[1]:]

    def _check_episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                       ways: int, query_y: Optional[Tensor] = None) -> None:
        check_episode(type(self).__name__, support_x, support_y, query_x, ways, query_y)
        check_input_dtype(type(self).__name__, support_x, self.backbone)


def check_input_dtype(who: str, x: Tensor, model: nn.Module) -> None:
    """Float inputs in the model's dtype (autocast aside), named here rather than deep inside
    it. Token ids (``TOKEN_DTYPES``) go to the model as they are."""
    weight = next(model.parameters(), x).dtype
    if x.is_floating_point() and x.dtype != weight and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{who}: the inputs are {x.dtype} but the model's weights are "
                         f"{weight}; convert one (x.to({weight}) or model.to({x.dtype}))")


# ---- helpers shared by the learners ------------------------------------------------------

def as_vectors(z: Tensor) -> Tensor:
    """``[T, N, *f]`` -> ``[T, N, prod(f)]``, at least float32 (the CPU kernels take no half
    types, and the small metric heads are worth full precision under autocast)."""
    return upcast(z.flatten(2))


def upcast(z: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; other dtypes unchanged."""
    return z.float() if z.dtype in _LOW_PRECISION else z


def in_weight_dtype(module: nn.Module, *xs: Tensor) -> tuple[Tensor, ...]:
    """``xs`` in the dtype of ``module``'s weights: a learned head of a model cast to half
    precision takes the (upcast) embeddings in its own dtype."""
    dtype = next(module.parameters()).dtype
    return tuple(x.to(dtype) for x in xs)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off: keeps cheap heads (matmuls, LSTMs, scores) out of bfloat16."""
    with torch.autocast(device.type, enabled=False):
        yield


def check_episode(who: str, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int,
                  query_y: Optional[Tensor] = None) -> None:
    """Raises ``ValueError`` naming the problem for a malformed episode (one host sync)."""
    for name, t in (("support_x", support_x), ("support_y", support_y), ("query_x", query_x),
                    ("query_y", query_y)):
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    T, S, Q = _check_shapes(who, support_x, query_x)
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise ValueError(f"{who}: ways must be a positive int, got {ways!r}")
    _check_label_tensor(who, "support_y", support_y, (T, S), support_x.device)
    if query_y is not None:
        _check_label_tensor(who, "query_y", query_y, (T, Q), support_x.device)
    _check_label_values(who, support_y, ways, query_y)


def _check_shapes(who: str, support_x: Tensor, query_x: Tensor) -> tuple[int, int, int]:
    if support_x.ndim < 3:
        raise ValueError(f"{who}: support_x must be [T, S, *sample] (e.g. [T, S, C, H, W]), got "
                         f"{list(support_x.shape)}; for one task add the task dim: x[None]")
    if query_x.ndim != support_x.ndim or query_x.shape[2:] != support_x.shape[2:]:
        sample = ", ".join(map(str, support_x.shape[2:]))
        raise ValueError(f"{who}: query_x must be [T, Q, {sample}] like support_x "
                         f"{list(support_x.shape)}, got {list(query_x.shape)}")
    if (not support_x.is_floating_point() and support_x.dtype not in TOKEN_DTYPES
            or query_x.dtype != support_x.dtype):
        raise ValueError(f"{who}: support_x and query_x must be floating-point tensors of one "
                         f"dtype, or int64/int32 token ids for a model that embeds them "
                         f"(integer images: scale them, e.g. x.float() / 255), got "
                         f"{support_x.dtype} and {query_x.dtype}")
    (T, S), Q = support_x.shape[:2], query_x.shape[1]
    if query_x.shape[0] != T:
        raise ValueError(f"{who}: support_x has {T} tasks but query_x has {query_x.shape[0]}")
    if T == 0 or S == 0 or Q == 0:
        raise ValueError(f"{who}: empty episode: {T} tasks, {S} support and {Q} query samples")
    if query_x.device != support_x.device:
        raise ValueError(f"{who}: support_x is on {support_x.device}, query_x on {query_x.device}")
    return T, S, Q


def _check_label_tensor(who: str, name: str, y: Tensor, shape: tuple[int, int],
                        device: torch.device) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{who}: {name} must hold integer class indices, got {y.dtype}")
    if tuple(y.shape) != shape:
        raise ValueError(f"{who}: {name} must have shape [T, {'S' if name[0] == 's' else 'Q'}] = "
                         f"{list(shape)} to match the images, got {list(y.shape)}")
    if y.device != device:
        raise ValueError(f"{who}: {name} is on {y.device} but the images are on {device}")


def _check_label_values(who: str, support_y: Tensor, ways: int,
                        query_y: Optional[Tensor]) -> None:
    present = (support_y.unsqueeze(-1) == torch.arange(ways, device=support_y.device)).any(-2)
    flags = [_outside(support_y, ways).any(), ~present.all()]
    if query_y is not None:
        flags.append(_outside(query_y, ways).any())
    bad = torch.stack(flags).tolist()  # the only host sync
    if bad[0]:
        _raise_outside(who, "support_y", support_y, ways)
    if bad[1]:
        t, c = (~present).nonzero()[0].tolist()
        raise ValueError(f"{who}: class {c} has no support sample in task {t}; every class in "
                         f"[0, {ways}) needs at least one shot")
    if len(bad) > 2 and bad[2]:
        _raise_outside(who, "query_y", query_y, ways)


def _outside(y: Tensor, ways: int) -> Tensor:
    return (y < 0) | (y >= ways)


def _raise_outside(who: str, name: str, y: Tensor, ways: int) -> None:
    t, i = _outside(y, ways).nonzero()[0].tolist()
    raise ValueError(f"{who}: {name}[{t}, {i}] = {int(y[t, i])} is outside [0, {ways}) "
                     f"(ways={ways})")
