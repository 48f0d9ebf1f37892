"""Process-group helpers for ``torchrun``: who am I, seeding, reductions. No env reads here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process (the CLI fills it from torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """Join the default process group (NCCL on CUDA, gloo on CPU) if there is more than one rank."""
    if info.enabled and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def barrier(info: DistInfo) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.barrier()


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (e.g. 'my loss is finite')."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def mean_across(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return tensor.item() / info.world_size
