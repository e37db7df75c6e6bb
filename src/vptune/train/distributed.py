"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``process_group_from_env`` (used by
``vptune train``) joins the process group they describe (gloo on CPU, nccl on GPU). Whenever a
process group is joined, ``fit`` shards every epoch with a DistributedSampler, wraps the
model in DDP (gradients averaged over processes, so N processes with batch b take the step of
one process with batch N*b) and sums evaluation counts over processes. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Subset


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched by
    torchrun with several processes, or when the caller already joined one (it then owns it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


@contextlib.contextmanager
def process_group_from_env(device: torch.device) -> Iterator[bool]:
    """Join torchrun's process group for the block (if launched so) and leave it after; yields
    whether this is the main process, the one that prints and writes."""
    owned = init_from_env(device)
    main = not is_distributed() or dist.get_rank() == 0
    try:
        yield main
    finally:
        if owned:
            dist.destroy_process_group()


def train_sampler(dataset: Dataset, seed: int, epoch: int) -> DistributedSampler:
    """This process's share of an epoch, shuffled by (seed, epoch) alike on every process."""
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


def eval_shard(dataset: Dataset) -> Dataset:
    """Every world_size-th image from this rank on: the shards cover the dataset exactly once."""
    if not is_distributed():
        return dataset
    return Subset(dataset, range(dist.get_rank(), len(dataset), world_size()))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model the training step runs: DDP over the tuned parameters when distributed."""
    if not is_distributed():
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def all_sum(values: list[Any], device: torch.device) -> list[float]:
    """``values`` summed over processes (unchanged when not distributed)."""
    if not is_distributed():
        return values
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [type(value)(total) for value, total in zip(values, tensor.tolist())]


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process: all of them stop together on a NaN, where a
    rank that stopped alone would leave the others waiting in DDP's gradient all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
