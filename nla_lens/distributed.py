"""Where this process sits in a `torchrun` job: its rank, the world size and its device.

nla_lens scales on PyTorch's own stack: `torchrun` (or any launcher that sets the same
environment) starts one process per device, and `process_group` joins them with NCCL on CUDA and
gloo on the CPU. Run without a launcher, everything here describes a world of one process and no
process group is created.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nla_lens.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's rank among `world_size` processes (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        try:
            world = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from exc
        if not 0 <= world.rank < world.world_size:
            raise ConfigError(f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}")
        return world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def device_for(world: World, device: str | torch.device) -> torch.device:
    """`cuda` means this rank's own GPU: `cuda:LOCAL_RANK`, or `cuda:0` where the launcher shows each rank one
    GPU (SLURM's `--gpus-per-task=1`). `cuda:N` is refused with more than one process where several GPUs are
    visible: every rank would load onto GPU N."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    visible = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", 0 if visible == 1 else world.local_rank)
    if world.is_distributed and visible > 1:
        raise ConfigError(f"device {str(device)!r} with {world.world_size} torchrun processes puts every rank on GPU "
                          f"{device.index}: set the device to 'cuda' (`--device cuda`, or `device: cuda` in the YAML "
                          f"config; each rank then takes cuda:LOCAL_RANK, its own GPU), or run one process to use "
                          f"{device}")
    return device


@contextlib.contextmanager
def process_group(device: str | torch.device, *, timeout: timedelta = timedelta(hours=12)) -> Iterator[World]:
    """Join the job's process group for the duration (a no-op for a single process).

    The long default timeout is for the end of sharded jobs, where fast ranks wait for the slowest.
    """
    world = World.from_env()
    created = world.is_distributed and not dist.is_initialized()
    if created:
        device = device_for(world, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if not created:
        yield world
        return
    try:
        yield world
        dist.barrier()  # tear down together: no rank leaves while another still runs a collective
    finally:
        # FSDP-sharded modules hold the group through reference cycles. Collected only at interpreter
        # shutdown, gloo's worker threads abort the process (SIGABRT), so collect them now.
        gc.collect()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if world.is_distributed:
        dist.barrier()


def inference(*modules: nn.Module) -> contextlib.AbstractContextManager:
    """`torch.inference_mode()`, or `torch.no_grad()` for FSDP-sharded modules: FSDP keeps the
    buffers it gathers and reuses them in training, which inference tensors may not be."""
    sharded = any(isinstance(p, DTensor) for module in modules for p in module.parameters())
    return torch.no_grad() if sharded else torch.inference_mode()
