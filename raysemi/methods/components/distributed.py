"""All-reduce helpers that keep method state identical on every worker (no-ops in one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over workers (no-op without a process group); returns the tensor."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(n)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over workers (no-op without a process group); returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every worker along dim 0 (identity without a process group)."""
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
