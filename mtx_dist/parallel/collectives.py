"""Differentiable collectives for contrastive losses over the data-parallel group.

torch.distributed.nn has an all_gather with autograd, but its backward is a reduce_scatter,
which gloo does not implement; these two functions pick reduce_scatter on NCCL and
all_reduce + slice elsewhere, so the same loss code runs on CPU (tests) and GPU (training).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0; the backward returns each rank the sum over
    ranks of the gradient for its own slice (every rank's loss may depend on every slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.world, ctx.rank = group, group_size(group), group_rank(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world, dim=0)[ctx.rank].contiguous(), None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...) on every rank, differentiable. Equal B on all ranks."""
    if group_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``x`` concatenated, with only this rank's slice carrying a gradient (OpenCLIP's
    cheaper mode: the gradient through other ranks' copies of our features is dropped)."""
    world = group_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[group_rank(group)] = x
    return torch.cat(parts, dim=0)


def _exchange(x: torch.Tensor, group, to_rank: int, from_rank: int) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), _global_rank(group, to_rank), group),
           dist.P2POp(dist.irecv, out, _global_rank(group, from_rank), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to ``to_rank`` and receive the tensor ``from_rank`` sent; the gradient travels
    the opposite way, back to the rank that owns the features."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, to_rank: int, from_rank: int) -> torch.Tensor:
        ctx.group, ctx.to_rank, ctx.from_rank = group, to_rank, from_rank
        return _exchange(x, group, to_rank, from_rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group, ctx.from_rank, ctx.to_rank), None, None, None


def ring_pass(x: torch.Tensor, group=None) -> torch.Tensor:
    """One step around the ring: send to rank+1, receive from rank-1 (in ``group``), differentiable."""
    world, rank = group_size(group), group_rank(group)
    return _NeighbourExchange.apply(x, group, (rank + 1) % world, (rank - 1) % world)
