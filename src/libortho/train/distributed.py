"""Data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

No wrapper module: every process holds the same model, takes its share of each optimizer step's
rows, accumulates gradients normalised by the *global* token counts, and the gradients are then
summed across processes (one flat all-reduce per parameter group). Because the loss is divided
by the global count before the sum, 1 process and N processes give the same update for the same
global batch, up to floating-point summation order. Launch with ``torchrun`` or ``accelerate
launch``; without an initialised process group everything here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes files and shows progress."""
    return rank_and_world()[0] == 0


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's share of one step's row indices (strided, so shares differ by at most one row)."""
    rank, world = rank_and_world()
    return idx[rank::world]


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all processes.

    A gradient missing on some processes counts as zeros there; one missing on *every* process stays
    None, as in a single process (so the optimizer skips that parameter rather than decaying it and
    moving it by its Adam moments).
    """
    if not is_distributed() or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    params = [p for p, has in zip(params, present.tolist(), strict=True) if has]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_sum(value: float) -> float:
    """A Python float summed over all processes."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def check_same_weights(model: nn.Module) -> None:
    """Refuse to train when processes start from different weights (a checksum per parameter)."""
    if not is_distributed():
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    ref = sums.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(sums, ref):
        raise RuntimeError("data-parallel processes start from different weights: load or seed the model "
                           "identically on every rank")
