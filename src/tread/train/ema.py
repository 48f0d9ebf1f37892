"""Exponential moving average of model weights, with a warm-up for short runs."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """Decay used after ``step`` optimizer updates (0-based).

    With warm-up the decay is ``min(decay, (1 + step) / (10 + step))``: the average forgets the
    random initialisation within the first few hundred steps, which matters for short runs where
    0.9999 would leave the EMA close to the initial weights.
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (its routes never apply unless asked).

    Under FSDP the copy is made before sharding, then sharded like the model (see
    :func:`tread.train.fsdp.shard_model`), so each rank averages only its own shards.
    """
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied).

    Sharded (FSDP) parameters are averaged shard by shard, on this rank's local tensors: the
    EMA and the model are sharded alike, so no communication is needed.
    """

    def _local(value: Tensor) -> Tensor:
        """This rank's shard of a DTensor (a view: updating it updates the parameter). Duck
        typed: importing torch.distributed.tensor would cost every run, FSDP or not."""
        to_local = getattr(value, "to_local", None)
        return to_local() if to_local is not None else value

    ema_params = [_local(p) for p in ema.parameters()]
    model_params = [_local(p.detach()) for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)
