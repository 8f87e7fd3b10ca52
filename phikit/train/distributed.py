"""Process setup for `torchrun`: rank and device, FSDP2 or DDP wrapping, gradient sync under accumulation.

References: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) and torchtitan `parallelize_llama`;
`torch.nn.parallel.DistributedDataParallel.no_sync`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..model import Phi3


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes the process group when launched by torchrun (tested: CPU, gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        return dist.get_rank(), world, device
    return 0, 1, device


def wrap(model: Phi3, world: int, ddp: bool, device: torch.device) -> torch.nn.Module:
    """FSDP2: each block is one unit of sharded parameters (gathered for its forward), the root holds
    embeddings, final norm and lm_head. DDP: a full replica per process, gradients all-reduced."""
    if world == 1:
        return model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Reduce gradients across processes only on the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def mean_across(x: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return x.item()
