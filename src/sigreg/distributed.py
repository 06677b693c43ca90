"""Global-batch reductions for SIGReg statistics under ``torch.distributed``.

The losses are functions of batch sums (means, second moments, characteristic-function
sums). Summing those over ranks with an autograd-aware all-reduce makes every rank compute
the loss of the *global* batch. The backward of a sum all-reduce is again a sum all-reduce:
each rank then holds ``world_size`` times its share of the gradient, which DDP's gradient
averaging divides back out, so parameter gradients equal single-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def use_distributed(flag: bool | None) -> bool:
    """Resolve a user's ``distributed`` option: None means 'whenever a group is running'."""
    if flag is None:
        return is_distributed()
    if flag and not is_distributed():
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return flag


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


# Collectives stay outside compiled graphs: torch.compile runs them eagerly between the
# compiled pieces of a regularizer.
@torch.compiler.disable
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all ranks."""
    return _AllReduceSum.apply(x)


def all_reduce_with_count(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``x`` and the per-rank sample ``count`` over all ranks in one all-reduce.

    Returns ``(global x, global count)``, the count as a 0-d tensor of ``x``'s dtype: the
    statistics of every layer of a stack then cost one collective, not one each plus one
    for the count.
    """
    packed = torch.cat((x.reshape(-1), x.new_full((1,), count)))
    total = all_reduce_sum(packed)
    return total[:-1].view(x.shape), total[-1]


@torch.compiler.disable
def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Make a (non-differentiable) tensor identical on every rank, e.g. random directions."""
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x
