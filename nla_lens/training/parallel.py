"""Data-parallel SFT under `torchrun`: DDP replicates the model, FSDP (FSDP2) shards it.

The trajectory does not depend on the world size. Every optimizer step trains on the same global
micro-batches (`loop.micro_batches`); each rank takes one contiguous slice of a micro-batch, and
every rank divides its summed loss by the micro-batch's global unit count (response tokens for the
AV, rows for the AR) over the world size. Averaging the ranks' gradients, as DDP and FSDP do, then
gives the single-process gradient up to float summation order. Checkpoints hold whole tensors, so
a run can resume on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from nla_lens.distributed import World


def current_world() -> World:
    """The initialised process group's ranks, or a world of one."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), World.from_env().local_rank)


class LossModule(nn.Module):
    """One module whose forward is the loss: DDP needs a single forward per backward, and the AV
    loss runs the model twice (blocks, then the final norm + unembed of scored positions only)."""

    def __init__(self, modules: dict[str, nn.Module], loss_sum: Callable[[Int[Tensor, " batch"]], Tensor]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.loss_sum = loss_sum

    def forward(self, index: Int[Tensor, " batch"], divisor: float) -> Float[Tensor, ""]:
        return self.loss_sum(index) / divisor


def rank_share(index: Int[Tensor, " batch"], world: World) -> tuple[Int[Tensor, " share"], bool]:
    """This rank's contiguous slice of a global micro-batch, and whether it counts.

    A rank left without rows (an epoch's last, short micro-batch) runs the first row and scales its
    loss by zero, so every rank still joins the gradient all-reduce.
    """
    share = index.tensor_split(world.world_size)[world.rank]
    return (share, True) if share.numel() else (index[:1], False)


def shard_modules(modules: dict[str, nn.Module], device: torch.device, *, bf16: bool) -> None:
    """FSDP2 in place: each TL block is its own unit, then each top-level module (embeddings, head,
    the AR readout). On CUDA with `bf16`, parameters are gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (current_world().world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    for module in modules.values():
        _make_parameters_contiguous(module)
        for block in getattr(module, "blocks", []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)


def _make_parameters_contiguous(module: nn.Module) -> None:
    """FSDP2 shards contiguous parameters only; the loader keeps TL weights as views in HF layout."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if not param.is_contiguous():
                setattr(owner, name, nn.Parameter(param.detach().contiguous(), requires_grad=param.requires_grad))


def wrap(loss_module: LossModule, data_parallel: str, device: torch.device) -> nn.Module:
    """What the loop calls for a micro-batch's loss: DDP around `loss_module`, or (FSDP, a world of
    one) the module itself."""
    if data_parallel == "ddp" and current_world().is_distributed:
        return DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
    return loss_module


def whole(tensor: Tensor) -> Tensor:
    """The full tensor behind an FSDP shard (a collective: every rank must call it), else `tensor`."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_on_main(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Whole CPU copies of the tensors on rank 0, an empty dict on the others (every rank must call
    this). FSDP shards are gathered one tensor at a time, so no other rank holds a whole model."""
    keep = current_world().is_main
    out = {}
    for name, tensor in named:
        full = whole(tensor.detach())
        if keep:
            out[name] = full.contiguous().cpu()
    return out


def like(full: Tensor, param: Tensor) -> Tensor:
    """`full` laid out as `param` is: this rank's shard of it when `param` is sharded."""
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum of a per-rank number over the ranks (the number itself in a world of one)."""
    if not current_world().is_distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of per-rank numbers over the ranks, in one collective."""
    if not current_world().is_distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()
