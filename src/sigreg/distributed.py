"""Global-batch reductions for SIGReg statistics under ``torch.distributed``.

The losses are functions of batch sums (means, second moments, characteristic-function
sums). Summing those over ranks with an autograd-aware all-reduce makes every rank compute
the loss of the *global* batch. The backward of a sum all-reduce is again a sum all-reduce:
each rank then holds ``world_size`` times its share of the gradient, which DDP's gradient
averaging divides back out, so parameter gradients equal single-process ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised.

    Examples:
        >>> import sigreg
        >>> sigreg.is_distributed()   # a single process
        False
    """
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


def _outside_compiled_graphs(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, made at the first call rather than at import (it
    imports torch._dynamo, ~2 s): torch.compile runs collectives eagerly between the
    compiled pieces of a regularizer."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


@_outside_compiled_graphs
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all ranks (the gradient is summed over ranks too).

    Needs an initialised process group (torch.distributed), as under torchrun.

    Examples:
        In each rank of a job launched with ``torchrun --nproc_per_node=2``:

        >>> x = torch.ones(3, requires_grad=True)                   # doctest: +SKIP
        >>> sigreg.all_reduce_sum(x)                                # doctest: +SKIP
        tensor([2., 2., 2.], grad_fn=<_AllReduceSumBackward>)
    """
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


@_outside_compiled_graphs
def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Make a (non-differentiable) tensor identical on every rank, e.g. random directions."""
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x


# ---- which layers each rank called: one plan for every rank --------------------------------
# A layer's statistics are sums over the ranks that called it. Every rank must then run the
# same collectives in the same order, also when layers run on some ranks only (LayerDrop,
# mixture-of-experts experts without tokens, conditional blocks): the ranks first exchange
# which layers they called, then all follow one plan made from that.

Layout = list[tuple[int, int, int]]  # (layer index, width C, rows N) per call, in call order


def cpu_group() -> Any:
    """A process group that takes CPU tensors: the default one when its backend includes
    gloo, else a gloo group over all ranks (a collective call: every rank makes it)."""
    return None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")


def all_gather_layouts(layout: Layout, group: Any = None) -> list[Layout]:
    """Every rank's layout, in rank order: two all-reduces of small CPU tensors on
    ``group`` (the longest layout's length, then a (ranks, length, 3) table that each rank
    fills in its own row), no device sync. Plain all-reduces, like every other collective
    here: ``all_gather_object`` left Gloo work behind that could abort a process at exit."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    longest = torch.tensor([len(layout)], dtype=torch.int64)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    table = torch.zeros(world, int(longest), 3, dtype=torch.int64)
    if layout:  # layer + 1: a row of zeros is no call
        table[rank, :len(layout)] = torch.tensor([(layer + 1, width, rows)
                                                  for layer, width, rows in layout])
    dist.all_reduce(table, group=group)
    return [[(layer - 1, width, rows) for layer, width, rows in calls if layer > 0]
            for calls in table.tolist()]


class PlannedGroup(NamedTuple):
    """Calls ``(layer, call number)`` of one regularizer and width, computed together:
    as one stack when every rank called all of them with equal rows (``stacked``), else
    one by one, a rank that did not call one taking part with no rows."""

    calls: list[tuple[int, int]]
    width: int
    stacked: bool


class LayerPlan(NamedTuple):
    groups: list[PlannedGroup]
    too_few: dict[tuple[int, int], int]  # calls with < 2 rows over all ranks (left out): rows


def plan_layers(layouts: list[Layout], layer_parts: Sequence[int]) -> LayerPlan:
    """The same plan on every rank from all ranks' layouts: calls, each (layer, its n-th
    call on a rank), grouped by (regularizer, width); calls and groups in the order they
    first appear in the layouts read rank by rank (a single process's order, so that
    resampled projections are the same as there).

    Raises:
        ValueError if a layer has different widths on different ranks.
    """
    rows: dict[tuple[int, int], list[int | None]] = {}  # call -> rows on each rank
    widths: dict[int, int] = {}
    for rank, layout in enumerate(layouts):
        calls_so_far: dict[int, int] = {}
        for layer, width, n in layout:
            if widths.setdefault(layer, width) != width:
                raise ValueError(f"layer {layer} has width {widths[layer]} on one rank and "
                                 f"{width} on rank {rank}")
            number = calls_so_far[layer] = calls_so_far.get(layer, -1) + 1
            rows.setdefault((layer, number), [None] * len(layouts))[rank] = n
    totals = {call: sum(n or 0 for n in on_ranks) for call, on_ranks in rows.items()}
    too_few = {call: total for call, total in totals.items() if total < 2}
    grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for call in rows:  # dicts keep the order of first appearance
        if call not in too_few:
            grouped.setdefault((layer_parts[call[0]], widths[call[0]]), []).append(call)
    groups = []
    for (_, width), calls in grouped.items():
        on_rank = [{rows[call][rank] for call in calls} for rank in range(len(layouts))]
        groups.append(PlannedGroup(calls, width, all(len(s) == 1 and None not in s
                                                     for s in on_rank)))
    return LayerPlan(groups, too_few)
