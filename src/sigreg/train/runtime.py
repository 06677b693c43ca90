"""Where a run executes: device choice, the torchrun process group and data-parallel sync.

Gradients are averaged by one all-reduce of a flat buffer per step rather than by
``DistributedDataParallel``: under torch 2.13 a DDP wrapper keeps its process group alive
after ``destroy_process_group()`` (its Gloo worker threads are never joined), and a worker
thread that drops the last reference to a collective's tensor while the interpreter shuts
down aborts the process ("terminate called without an active exception"). Without DDP,
:func:`distributed_runtime` destroys the group, joining those threads, while Python is alive.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA if available, then MPS, then CPU. Explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps requested but MPS is not available")
    if name not in ("cpu", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def launched_world_size() -> int:
    """Number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def distributed_runtime(device: str) -> Iterator[Runtime]:
    """The runtime of this process; joins the process group when launched by torchrun.

    A group this function created is destroyed on the way out, on every path (success,
    divergence, interrupt), so no collective's worker thread outlives the interpreter.
    A group the caller initialised itself is left to the caller.
    """
    world = launched_world_size()
    if world == 1:
        yield Runtime(pick_device(device))
        return
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    owned = not dist.is_initialized()
    if owned:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # torch imports dynamo lazily (the optimizer's first add_param_group does); imported
        # after the group exists, it keeps the group alive past destroy_process_group() and
        # a rank can abort at exit ("terminate called without an active exception", torch
        # 2.13, about one run in ten here). Imported before, it does not.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Runtime(dev, dist.get_rank(), dist.get_world_size())
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def sum_over_ranks(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world_size > 1:
        dist.all_reduce(values)
    return values


def gather_from_ranks(value: torch.Tensor, runtime: Runtime) -> list[torch.Tensor]:
    """Every rank's ``value`` (same shape and dtype on all ranks), as CPU tensors in rank
    order; every rank must call it. Goes through the device, which NCCL requires."""
    if runtime.world_size == 1:
        return [value.cpu()]
    local = value.to(runtime.device)
    parts = [torch.empty_like(local) for _ in range(runtime.world_size)]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def broadcast_state(module: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's parameters and buffers (one broadcast per tensor, at start)."""
    if runtime.world_size > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def average_gradients(params: Iterable[nn.Parameter], runtime: Runtime) -> None:
    """Mean of each gradient over the ranks, in one all-reduce of a flat buffer.

    A parameter without a gradient on this rank counts as zero, so every rank sends a buffer
    of the same layout whatever its forward pass touched.
    """
    if runtime.world_size == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= runtime.world_size
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p)


def average_buffers(module: nn.Module, runtime: Runtime) -> None:
    """Mean of the floating-point buffers (BatchNorm statistics) over the ranks, so every rank
    evaluates and rank 0 saves statistics of the whole data, not of its own shard."""
    if runtime.world_size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= runtime.world_size
