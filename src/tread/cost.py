"""Analytic cost model: forward FLOPs of a DiT-style backbone under a route list.

FLOPs count multiply-adds as 2 (the convention of ``torch.utils.flop_counter``) and only the
matrix products (linears, the patch convolution, attention scores and values); element-wise
work is ignored, as it is in the counter. A training step (forward + backward) costs about
3x the forward, so the ideal training speed-up of a route list is dense / routed forward FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .models.backbone import unwrap
from .models.dit import DiTConfig
from .models.registry import MODEL_CONFIGS
from .routing import Route, resolve_routes

# What the cost model can price: a built tread backbone, its config, or a registry name.
ModelLike = nn.Module | DiTConfig | str
# A route as a tread.Route or as a plain (start, end, ratio) tuple.
RouteLike = Route | tuple[int, int, float]


def _config_of(model: Any) -> DiTConfig:
    """The DiTConfig of a built tread model (through DDP/compile wrappers), a config or a name."""
    if isinstance(model, DiTConfig):
        return model
    if isinstance(model, str):
        if model not in MODEL_CONFIGS:
            raise ValueError(
                f"unknown model {model!r} for the cost model; choose one of "
                f"{', '.join(MODEL_CONFIGS)}"
            )
        return MODEL_CONFIGS[model]
    inner = unwrap(model) if isinstance(model, nn.Module) else model
    config = getattr(inner, "config", None)
    if not isinstance(config, DiTConfig):
        raise ValueError(
            f"the cost model prices tread DiT backbones only, got {type(model).__name__}: pass a "
            "model from tread.build_model(...), a tread.models.DiTConfig or a registry name such "
            "as 'DiT-B/2'; for another block stack, count its FLOPs with "
            "torch.utils.flop_counter.FlopCounterMode"
        )
    return config


def _as_routes(routes: Sequence[RouteLike]) -> list[Route]:
    """Routes given as tread.Route or (start, end, ratio) tuples, as tread.Route."""
    if isinstance(routes, Route):
        raise ValueError("routes must be a list of routes, got a single Route (wrap it in [...])")
    result: list[Route] = []
    for route in routes:
        if isinstance(route, Route):
            result.append(route)
        elif isinstance(route, (tuple, list)) and len(route) == 3:
            result.append(Route(*route))
        else:
            raise ValueError(
                f"routes must be tread.Route or (start, end, ratio) tuples, got {route!r}"
            )
    return result


def block_flops(config: DiTConfig, num_tokens: int) -> int:
    """Forward FLOPs of one DiT block on ``num_tokens`` tokens of one sample."""
    D, n = config.width, num_tokens
    linear = 2 * n * D * (3 * D + D + 2 * config.mlp_hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n * n * D  # scores Q K^T and weighted values, over all heads
    modulation = 2 * D * 6 * D  # adaLN: one (D -> 6D) linear per sample
    return linear + attention + modulation


def forward_flops(
    model: ModelLike,
    routes: Sequence[RouteLike] = (),
    *,
    batch: int = 1,
) -> int:
    """Forward FLOPs of a DiT-style model for ``batch`` inputs at its configured input size.

    Args:
        model: a built tread model (``model.config``, also inside DDP or ``torch.compile``), a
            :class:`DiTConfig` or a registry name such as ``"DiT-B/2"``.
        routes: routes applied in this forward pass, as :class:`Route` or (start, end, ratio)
            tuples (negative indices allowed).
        batch: number of samples.

    Returns:
        FLOPs (2 per multiply-add) of embed + blocks + head.

    Raises:
        ValueError: ``model`` is not one of the above (e.g. a plain block list), naming what is
            needed; or an invalid route.
    """
    config = _config_of(model)
    N, D, p = config.num_tokens, config.width, config.patch_size
    tokens_at = [N] * config.depth
    for route in resolve_routes(_as_routes(routes), config.depth):
        for index in range(route.start, route.end + 1):
            tokens_at[index] = route.num_kept(N)
    embed = 2 * N * config.in_channels * p * p * D + 2 * (256 * D + D * D)
    head = 2 * D * 2 * D + 2 * N * D * p * p * config.out_channels
    blocks = sum(block_flops(config, n) for n in tokens_at)
    return batch * (embed + blocks + head)


def ideal_speedup(model: ModelLike, routes: Sequence[RouteLike]) -> float:
    """Ideal training-step speed-up of ``routes`` over the dense model: dense / routed FLOPs.

    Args:
        model: as for :func:`forward_flops`: a built tread model, a :class:`DiTConfig` or a
            registry name.
        routes: :class:`Route` objects or (start, end, ratio) tuples.

    Returns:
        The FLOP ratio, >= 1 (1.0 for ``routes=[]``).
    """
    return forward_flops(model) / forward_flops(model, routes)
