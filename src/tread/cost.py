"""Analytic cost model: forward FLOPs of a registry backbone under a route list.

FLOPs count multiply-adds as 2 (the convention of ``torch.utils.flop_counter``) and only the
matrix products (linears, the patch convolution, attention scores and values); element-wise
work is ignored, as it is in the counter, except where a backbone's main work is element-wise
(the selective scan of Mamba, the WKV of RWKV): those configs count it and say how in their
``block_flops``. Each backbone config prices its own embed, block and head
(:class:`tread.models.backbone.ArchConfig`); this module adds them up under the routes. A
training step (forward + backward) costs about 3x the forward, so the ideal training speed-up
of a route list is dense / routed forward FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .models.backbone import ArchConfig, unwrap
from .models.registry import MODEL_CONFIGS
from .routing import Route, resolve_routes

# What the cost model can price: a built tread backbone, its config, or a registry name.
ModelLike = nn.Module | ArchConfig | str
# A route as a tread.Route or as a plain (start, end, ratio) tuple.
RouteLike = Route | tuple[int, int, float]


def _config_of(model: Any) -> ArchConfig:
    """The config of a built tread model (through DDP/compile wrappers), a config or a name."""
    if isinstance(model, ArchConfig):
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
    if not isinstance(config, ArchConfig):
        raise ValueError(
            f"the cost model prices tread registry backbones only, got {type(model).__name__}: "
            "pass a model from tread.build_model(...), its .config or a registry name such as "
            "'DiT-B/2'; for another block stack, give its config the ArchConfig FLOP methods "
            "(docs/backbones.md) or count with torch.utils.flop_counter.FlopCounterMode"
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


def forward_flops(
    model: ModelLike,
    routes: Sequence[RouteLike] = (),
    *,
    batch: int = 1,
) -> int:
    """Forward FLOPs of a registry backbone for ``batch`` inputs at its configured input size.

    Args:
        model: a built tread model (``model.config``, also inside DDP or ``torch.compile``), its
            config (a :class:`~tread.models.backbone.ArchConfig`) or a registry name such as
            ``"DiT-B/2"``.
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
    N = config.num_tokens
    tokens_at = [N] * config.depth
    for route in resolve_routes(_as_routes(routes), config.depth):
        for index in range(route.start, route.end + 1):
            tokens_at[index] = route.num_kept(N)
    blocks = sum(config.block_flops(n) for n in tokens_at)
    return batch * (config.embed_flops() + blocks + config.head_flops())


def ideal_speedup(model: ModelLike, routes: Sequence[RouteLike]) -> float:
    """Ideal training-step speed-up of ``routes`` over the dense model: dense / routed FLOPs.

    Args:
        model: as for :func:`forward_flops`: a built tread model, its config or a registry
            name.
        routes: :class:`Route` objects or (start, end, ratio) tuples.

    Returns:
        The FLOP ratio, >= 1 (1.0 for ``routes=[]``).
    """
    return forward_flops(model) / forward_flops(model, routes)
