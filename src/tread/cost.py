"""Analytic cost model: forward FLOPs of a DiT-style backbone under a route list.

FLOPs count multiply-adds as 2 (the convention of ``torch.utils.flop_counter``) and only the
matrix products (linears, the patch convolution, attention scores and values); element-wise
work is ignored, as it is in the counter. A training step (forward + backward) costs about
3x the forward, so the ideal training speed-up of a route list is dense / routed forward FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .models.dit import DiTConfig
from .routing import Route, resolve_routes


def _config_of(model: nn.Module | DiTConfig) -> DiTConfig:
    config = model if isinstance(model, DiTConfig) else getattr(model, "config", None)
    if not isinstance(config, DiTConfig):
        raise ValueError(f"cannot read a DiTConfig from {type(model).__name__}")
    return config


def block_flops(config: DiTConfig, num_tokens: int) -> int:
    """Forward FLOPs of one DiT block on ``num_tokens`` tokens of one sample."""
    D, n = config.width, num_tokens
    linear = 2 * n * D * (3 * D + D + 2 * config.mlp_hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n * n * D  # scores Q K^T and weighted values, over all heads
    modulation = 2 * D * 6 * D  # adaLN: one (D -> 6D) linear per sample
    return linear + attention + modulation


def forward_flops(
    model: nn.Module | DiTConfig,
    routes: Sequence[Route] = (),
    *,
    batch: int = 1,
) -> int:
    """Forward FLOPs of a DiT-style model for ``batch`` inputs at its configured input size.

    Args:
        model: a built model (``model.config``) or a :class:`DiTConfig`.
        routes: routes applied in this forward pass (negative indices allowed).
        batch: number of samples.

    Returns:
        FLOPs (2 per multiply-add) of embed + blocks + head.
    """
    config = _config_of(model)
    N, D, p = config.num_tokens, config.width, config.patch_size
    tokens_at = [N] * config.depth
    for route in resolve_routes(routes, config.depth):
        for index in range(route.start, route.end + 1):
            tokens_at[index] = route.num_kept(N)
    embed = 2 * N * config.in_channels * p * p * D + 2 * (256 * D + D * D)
    head = 2 * D * 2 * D + 2 * N * D * p * p * config.out_channels
    blocks = sum(block_flops(config, n) for n in tokens_at)
    return batch * (embed + blocks + head)


def ideal_speedup(model: nn.Module | DiTConfig, routes: Sequence[Route]) -> float:
    """Ideal training-step speed-up of ``routes`` over the dense model: dense / routed FLOPs."""
    return forward_flops(model) / forward_flops(model, routes)
