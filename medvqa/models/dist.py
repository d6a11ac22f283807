"""Negatives from every rank under torchrun, for the contrastive losses (CMCL, CMDPI Eq. 7)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """(m, ...) on each rank -> (world·m, ...) in rank order. Every rank's loss reads this rank's
    rows, so their gradient is the sum over ranks of the incoming gradient, cut to these rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        m = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * m:(dist.get_rank() + 1) * m]


def gather_rows(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows concatenated over all ranks, in rank order; identity on one process.

    Every rank then computes the loss of the global batch, and DDP's average of the parameter
    gradients equals the gradient of one process holding that batch. Ranks may hold different
    numbers of rows (CMDPI's group sampler makes batches of unequal size): rows are padded to the
    largest count and cut back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return xs
    n = torch.tensor([len(xs[0])], device=xs[0].device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    out = []
    for x in xs:
        flag = x.dtype == torch.bool                     # masks travel as uint8 (not every backend has bool)
        x = x.to(torch.uint8) if flag else x
        g = _AllGather.apply(torch.cat([x, x.new_zeros(m - len(x), *x.shape[1:])]))   # (world·m, ...)
        g = torch.cat([g[r * m:r * m + s] for r, s in enumerate(sizes)])
        out.append(g.bool() if flag else g)
    return tuple(out)
