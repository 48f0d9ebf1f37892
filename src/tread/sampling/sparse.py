"""Sparse guidance branches: the same network run with explicit inference-time routes.

SG (arXiv 2601.01608, paper-notes §12) evaluates one network twice at two skip ratios
gamma_strong < gamma_weak over the same spans. A branch here is a prediction callable that runs
the raw network as ``net(x, t, y, routes=[Route(start, end, gamma)], plans=...)`` and hands the
output to the objective's ``prediction``, so EDM preconditioning and flow velocities both work
and the samplers stay unaware of routing. Each sample's kept tokens are drawn from that sample's
own generator, so sample i does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.routing import Route, RoutePlan, resolve_routes, sample_plan
from tread.transport import Objective

from .guidance import Branch
from .rng import NoiseSource, PerSampleRNG

# A routable raw network: ``net(x, t, y, routes=..., plans=...)`` (tread backbones).
RoutableNet = Callable[..., Tensor]


@dataclass(frozen=True)
class SparseGuidance:
    """Skip ratios of the two SG branches and the block spans they are routed over.

    Attributes:
        strong_ratio: gamma_strong, the strong branch's skip ratio (0 = dense).
        weak_ratio: gamma_weak, the weak branch's skip ratio; strong_ratio < weak_ratio < 1.
        spans: (start, end) inclusive block spans, in block order (negative = from the end).
    """

    strong_ratio: float
    weak_ratio: float
    spans: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        for name in ("strong_ratio", "weak_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"sparse guidance: {name}={value!r} must be in [0, 1)")
        if not self.strong_ratio < self.weak_ratio:
            raise ConfigError(
                f"sparse guidance: strong_ratio={self.strong_ratio!r} must be below "
                f"weak_ratio={self.weak_ratio!r} (the weak branch skips more tokens)"
            )
        if not self.spans:
            raise ConfigError("sparse guidance needs at least one (start, end) span to route")
        try:
            self.routes(self.weak_ratio)
        except ValueError as err:
            raise ConfigError(f"sparse guidance: {err}") from None

    def routes(self, ratio: float) -> list[Route]:
        """The routes of a branch with skip ratio ``ratio``: one per span, none when dense.

        Args:
            ratio: the branch's skip ratio.

        Returns:
            ``[Route(start, end, ratio), ...]``, or ``[]`` for ratio 0 (the dense network).
        """
        return [] if ratio == 0 else [Route(start, end, ratio) for start, end in self.spans]

    def check_depth(self, depth: int) -> None:
        """Refuse spans outside a model of ``depth`` blocks, or overlapping ones.

        Raises:
            ConfigError: naming the span and the depth.
        """
        try:
            resolve_routes(self.routes(self.weak_ratio), depth)
        except ValueError as err:
            raise ConfigError(f"sparse guidance route: {err}") from None


def draw_plans(
    routes: Sequence[Route],
    num_tokens: int,
    rows: Tensor,
    rng: NoiseSource | None,
    *,
    device: torch.device,
    keep_order: bool = False,
) -> list[RoutePlan]:
    """Kept-token plans for one branch call, row by row from each sample's own generator.

    Args:
        routes: the branch's routes, each with fewer kept than total tokens.
        num_tokens: N, tokens per sample entering the blocks.
        rows: (B_in,) positions of the call's inputs in the sampler batch (which generators).
        rng: per-sample streams (batch-size invariant), one shared generator, or None (the
            global RNG).
        device: where the plans' indices go (the model's device).
        keep_order: sort each plan's indices (scan backbones need raster order).

    Returns:
        One plan per route, each with keep (B_in, K).
    """
    plans = []
    for route in routes:
        kept = route.num_kept(num_tokens)
        if isinstance(rng, PerSampleRNG):
            keep = torch.cat(
                [
                    sample_plan(
                        1, num_tokens, kept, generator=rng.generators[i], keep_order=keep_order
                    ).keep  # (1, K) drawn on the generator's device
                    for i in rows.tolist()
                ]
            ).to(device)  # B_in x (1, K) -> (B_in, K)
        else:
            keep = sample_plan(
                rows.numel(), num_tokens, kept, generator=rng, device=device, keep_order=keep_order
            ).keep  # (B_in, K)
        plans.append(RoutePlan(keep))
    return plans


def _attribute(net: Any, name: str) -> Any:
    """``net.<name>``, looking through DDP (``.module``) and compile (``._orig_mod``) wrappers."""
    inner = net
    for _ in range(4):
        if hasattr(inner, name):
            return getattr(inner, name)
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if inner is None:
            break
    return None


def routed_branch(
    objective: Objective,
    net: RoutableNet,
    routes: Sequence[Route],
    rng: NoiseSource | None,
    *,
    model: Any = None,
) -> Branch:
    """A branch that runs ``net`` with explicit ``routes`` and plans drawn per sample.

    Routes that would keep every token (ratio 0, or too few tokens to skip one) are dropped: the
    plain loop is what they compute, and they draw nothing.

    Args:
        objective: the training objective; its ``prediction`` wraps the raw network.
        net: raw network taking ``routes=`` and ``plans=`` keywords (e.g. a tread backbone, or a
            counting wrapper around one).
        routes: the branch's routes; ``[]`` is the dense network.
        rng: source of the routing draws (see :func:`draw_plans`).
        model: the backbone behind ``net``, read for ``num_tokens`` and ``keep_order``
            (default: ``net`` itself).

    Returns:
        Branch callable ``(x, time, y, rows) -> prediction``.
    """
    model = net if model is None else model
    num_tokens = _attribute(model, "num_tokens")
    if routes and not isinstance(num_tokens, int):
        raise ConfigError(
            "sparse guidance needs a routable tread backbone (with num_tokens), got "
            f"{type(model).__name__}"
        )
    active = [r for r in routes if r.num_kept(num_tokens) < num_tokens] if routes else []
    keep_order = bool(_attribute(model, "keep_order"))

    def branch(x: Tensor, time: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        def raw(x_in: Tensor, t_in: Tensor, y_in: Tensor) -> Tensor:
            if not active:
                return net(x_in, t_in, y_in, routes=[])  # [] = dense in any mode
            plans = draw_plans(
                active, num_tokens, rows, rng, device=x_in.device, keep_order=keep_order
            )
            return net(x_in, t_in, y_in, routes=active, plans=plans)

        return objective.prediction(raw)(x, time, y)

    return branch
