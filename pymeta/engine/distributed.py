"""Data-parallel meta-training over processes (``torch.distributed``).

Every process draws the same meta-batch and adapts its own share of the tasks; the weighted
meta-gradients are summed across processes, so a step equals the single-process step on the
whole meta-batch (up to the order of float sums). No DDP wrapper is involved: learners call
their networks functionally, which DDP's forward hooks would not see.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world() -> int:
    """The number of processes a launcher such as ``torchrun`` started (1 if none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group():
    """Joins the process group that a launcher (``torchrun``) describes in the environment
    for the ``with`` block, and yields this process's rank: gloo for CPU tensors and, where
    CUDA is available, NCCL for CUDA ones, each process on its ``LOCAL_RANK``'s GPU. Without
    a launcher, yields 0."""
    if launched_world() == 1 or dist.is_initialized():
        yield rank_and_world()[0]
        return
    if not dist.is_available():
        raise RuntimeError("several processes were launched, but this torch build has no "
                           "torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    # process 0 writes checkpoints while the others wait
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(hours=1))
    try:
        yield dist.get_rank()
        # The last collective holds no Python tensors: gloo's worker threads outlive
        # destroy_process_group, and one that released a collective's Python-owned tensors
        # while the interpreter shut down aborted the process (torch 2.13: 2 runs in 47)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_device(device: str) -> None:
    """One GPU per process: training on CUDA needs a GPU for this process's ``LOCAL_RANK``."""
    if rank_and_world()[1] == 1 or device != "cuda":
        return
    gpus = torch.cuda.device_count()
    if local_rank() >= gpus:
        raise ValueError(f"the process of LOCAL_RANK {local_rank()} has no GPU (torch sees "
                         f"{gpus}): launch one process per GPU")


def task_share(tasks: int, rank: int, world: int) -> tuple[int, int]:
    """The tasks ``[start, stop)`` of a ``tasks``-task meta-batch that ``rank`` adapts:
    contiguous, as equal as they can be."""
    if tasks < world:
        raise ValueError(f"a meta-batch of {tasks} tasks cannot be shared by {world} "
                         f"processes: use a meta-batch of at least {world}")
    return rank * tasks // world, (rank + 1) * tasks // world


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [c.view(t.shape) for c, t in zip(flat.split(sizes), like)]


def _by_dtype(items: list, dtype=lambda t: t.dtype) -> list[list]:
    """Groups in a fixed dtype order: every process must issue the same collectives in the
    same order (a set of dtypes iterates in an order that differs between processes)."""
    dtypes = sorted({dtype(t) for t in items}, key=str)
    return [[t for t in items if dtype(t) == d] for d in dtypes]


def sum_gradients(params: list[torch.Tensor], weight: float) -> None:
    """Sets each ``.grad`` to the sum over processes of ``weight * .grad``. A parameter that
    has no gradient in any process keeps none (optimizers then leave it alone)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise ValueError("data-parallel training supports dense gradients only")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=params[0].device)
    dist.all_reduce(has)
    for group in _by_dtype([p for p, n in zip(params, has.tolist()) if n]):
        flat = _flat([p.grad * weight if p.grad is not None else torch.zeros_like(p)
                      for p in group])
        dist.all_reduce(flat)
        for p, g in zip(group, _unflat(flat, group)):
            p.grad = g


def buffer_snapshot(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy of its value) for each floating buffer (running statistics)."""
    return [(b, b.clone()) for b in module.buffers() if b.is_floating_point()]


def sum_buffer_changes(snapshot: list[tuple[torch.Tensor, torch.Tensor]],
                       weight: float) -> None:
    """Each buffer of ``snapshot`` becomes its copy plus the ``weight``-weighted sum over
    processes of its change since: what one process accumulates over the whole meta-batch,
    and exactly the copy for buffers no process changed."""
    for group in _by_dtype(snapshot, dtype=lambda pair: pair[0].dtype):
        buffers, start = [b for b, _ in group], [s for _, s in group]
        flat = (_flat(buffers) - _flat(start)) * weight
        dist.all_reduce(flat)
        for b, s, d in zip(buffers, start, _unflat(flat, buffers)):
            b.copy_(s + d)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copies ``src``'s parameters and buffers into every process's ``module``."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``values`` over processes (a new tensor)."""
    values = values.clone()
    dist.all_reduce(values)
    return values


def barrier() -> None:
    dist.barrier()


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order, in every process."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_process_0(compute):
    """``compute()`` as process 0 returns it (picklable), in every process; only process 0
    calls it. A ValueError it raises is raised in every process, so that none waits for a
    result that will not come. Without a process group: ``compute()``."""
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    try:
        box = [("ok", compute()) if rank == 0 else None]
    except ValueError as e:
        box = [("error", e)]
    dist.broadcast_object_list(box, 0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
