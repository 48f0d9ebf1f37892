"""Process-group helpers for ``torchrun``: who am I, seeding, reductions. No env reads here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

# Generous on purpose: while rank 0 computes metrics or writes a checkpoint, the other ranks wait
# in a collective, and the backends' default timeout (10 min for NCCL) would kill a healthy run.
DEFAULT_TIMEOUT_MINUTES = 60.0


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


def init_process_group(
    info: DistInfo,
    device: torch.device,
    *,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> torch_dist.ProcessGroup | None:
    """Join the default process group (NCCL on CUDA, gloo on CPU) if there is more than one rank.

    Returns:
        A gloo group for host-side flags and barriers (None = the default group, already gloo,
        or a single process). Agreeing on a Python flag through NCCL would copy it to the GPU and
        back, a device->host synchronisation; through gloo it never touches the device.
    """
    if not info.enabled:
        return None
    timeout = timedelta(minutes=timeout_minutes)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend, rank=info.rank, world_size=info.world_size, timeout=timeout
        )
    if torch_dist.get_backend() == "gloo":
        return None
    return torch_dist.new_group(backend="gloo", timeout=timeout)


def barrier(info: DistInfo, group: torch_dist.ProcessGroup | None = None) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.barrier(group=group)


def all_true(flag: bool, info: DistInfo, group: torch_dist.ProcessGroup | None = None) -> bool:
    """True only if ``flag`` is true on every rank (e.g. 'I am within the time budget').

    Runs on the CPU: pass the host group of :func:`init_process_group` under NCCL.
    """
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN, group=group)
    return bool(value.item() > 0)


def sum_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place on its own device (no host synchronisation)."""
    if info.enabled:
        torch_dist.all_reduce(values)
    return values
