"""Distributed data parallelism under torchrun: each rank runs a disjoint slice of the calibration
samples and the sums are all-reduced block by block, so every rank holds the global statistics."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_(self, t: torch.Tensor) -> None:
        if self.active:
            torch.distributed.all_reduce(t)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    # torch.distributed.nn binds `group.WORLD` as default arguments when it is imported (transformers
    # imports it through torch._dynamo while the model skeleton is built). Imported after the group
    # exists, it would keep the group alive past destroy_process_group, and gloo's threads would then
    # die with the interpreter: an occasional SIGABRT ("terminate called without an active exception")
    # on exit. Imported first, it binds None.
    import torch.distributed.nn  # noqa: F401

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        with _stdout_to_stderr():  # gloo announces its connections on stdout, which carries results only
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            dist.barrier()
        here = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank if use_cuda else None, initialized_here=here)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Route file descriptor 1 to stderr (C++ libraries write there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def shutdown_distributed(info: DistInfo) -> None:
    if info.active and info.initialized_here:
        torch.distributed.destroy_process_group()


def shard_samples(n: int, info: DistInfo) -> slice:
    """This rank's contiguous, disjoint share of n samples."""
    return slice(n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size)
