"""Data-parallel training across processes and machines, launched by ``torchrun``.

``torchrun --nproc_per_node N -m memrl <command> ...`` starts N copies of a trainer; each reads
its place from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) when its :class:`~memrl.runs.Run` is made, and joins one process group (gloo
on CPU, NCCL on CUDA, one GPU per process). Every rank builds the same model, rank 0's weights
are broadcast, each rank computes gradients on its own share of the global batch, and
:func:`average_gradients` makes every rank take the same optimiser step. Rank 0 alone writes
the run directory. Without torchrun every function here is the identity (world size 1).

Gradients are all-reduced explicitly after ``backward()`` rather than through
``DistributedDataParallel``'s wrapper: memrl's models are trained through their own methods
(``policy.step``, ``model.loss``, ...), not through ``forward``, which is the only call DDP's
wrapper hooks; one flat all-reduce per step costs the same on models of this size.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment is set)."""
    return all(name in os.environ for name in _ENV)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group if launched by it (once per process); returns the device
    this rank trains on (``cuda:LOCAL_RANK`` on CUDA)."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def active() -> bool:
    """More than one process trains together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that logs, plots and writes files."""
    return rank() == 0


def shutdown() -> None:
    """Wait for every rank, then leave the process group (the end of a successful command)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(*modules: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``modules``."""
    if not active():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters) -> None:
    """All-reduce the gradients of ``parameters`` (those that require grad) to their mean over
    ranks, in one flat message. A parameter without a gradient counts as zero on that rank, so
    every rank steps the same parameters."""
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    max_grad_norm: float | None = None,
) -> float | None:
    """One optimiser step that every rank takes identically: zero the gradients, backpropagate
    ``loss``, average the gradients of ``parameters`` over ranks, clip their global norm to
    ``max_grad_norm`` (unless None) and step. Returns the norm before clipping, or None."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    optimizer.step()
    return grad_norm


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks, on ``tensor``'s device (a new tensor)."""
    if not active():
        return tensor.clone()
    # NCCL reduces CUDA tensors only: CPU figures travel through this rank's GPU
    nccl = dist.get_backend() == "nccl"
    out = tensor.detach().to("cuda" if nccl else tensor.device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def mean_over_ranks(figures: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it (ranks may report different keys, e.g. an
    episode return only where an episode ended)."""
    if not active():
        return dict(figures)
    reports = gather_objects({k: float(v) for k, v in figures.items()})
    keys = dict.fromkeys(k for report in reports for k in report)
    return {k: sum(r[k] for r in reports if k in r) / sum(k in r for r in reports) for k in keys}


def shard_indices(n: int, epoch: int | None, seed: int) -> torch.Tensor:
    """This rank's share of ``range(n)`` for one epoch, through torch's DistributedSampler:
    shuffled by (``seed``, ``epoch``) identically on every rank, padded by repetition so every
    rank gets the same count, and dealt out round-robin. Rank r's i-th minibatch of size b is
    then its part of the global minibatch the same permutation's i-th b·N items would form on one
    process. ``epoch=None`` (evaluation): in order, without padding."""
    if epoch is None:
        return torch.arange(rank(), n, world_size())
    sampler = DistributedSampler(
        range(n), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)
