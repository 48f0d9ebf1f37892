"""The routable-backbone contract: embed -> blocks (through route_blocks) -> head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..routing import Route, RoutePlan, resolve_routes, route_blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class RoutableBackbone(nn.Module):
    """Base class of every backbone; subclasses implement ``embed`` and ``head``.

    Subclasses provide:
        ``embed(x, t, y) -> (tokens (B, N, D), cond, aux)`` where ``aux`` maps names to
        token-aligned tensors (B, N, ...) that blocks take as keyword arguments;
        ``blocks``: an ``nn.ModuleList`` called as ``block(tokens, cond, **aux)``;
        ``head(tokens, cond) -> output``.

    The forward contract (design.md): with ``routes=None`` the configured routes apply in
    train mode and the model is dense in eval mode; explicit ``routes`` apply in any mode;
    ``routes=[]`` is dense.
    """

    blocks: nn.ModuleList

    def __init__(
        self,
        routes: Sequence[Route] = (),
        *,
        depth: int,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
    ) -> None:
        super().__init__()
        self.routes = resolve_routes(tuple(routes), depth)  # fails at build time if invalid
        self.keep_order = keep_order
        self.fp32_after_reinsert = fp32_after_reinsert

    @property
    def num_tokens(self) -> int:
        """Tokens per sample entering the blocks (N)."""
        raise NotImplementedError

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Any, dict[str, Tensor]]:
        raise NotImplementedError

    def head(self, tokens: Tensor, cond: Any) -> Tensor:
        raise NotImplementedError

    def active_routes(self, routes: Sequence[Route] | None) -> Sequence[Route]:
        """Routes for this call: explicit ones always, configured ones only in train mode."""
        if routes is not None:
            return routes
        return self.routes if self.training else ()

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        routes: Sequence[Route] | None = None,
        generator: torch.Generator | None = None,
        plans: Sequence[RoutePlan] | None = None,
    ) -> Tensor:
        """Denoiser network output.

        Args:
            x: (B, C, H, W) noisy input.
            t: (B,) float time / noise-level conditioning.
            y: (B,) long class labels; ``num_classes`` is the null label.
            routes: None = configured routes in train mode, dense in eval; a list applies as is.
            generator: randomness of the token subsets (one draw per active route, in route
                order); ``EDM.loss`` / ``FlowMatching.loss`` pass their generator here, so with
                None the draw comes from the global RNG only in a caller's own forward calls.
            plans: explicit kept-token plans, one per active route, instead of drawing.

        Returns:
            (B, C_out, H, W).
        """
        tokens, cond, aux = self.embed(x, t, y)
        tokens = route_blocks(
            self.blocks,
            tokens,
            cond,
            self.active_routes(routes),
            aux=aux,
            generator=generator,
            keep_order=self.keep_order,
            fp32_after_reinsert=self.fp32_after_reinsert,
            plans=plans,
        )
        return self.head(tokens, cond)
