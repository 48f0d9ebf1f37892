"""The routable-backbone contract: embed -> blocks (through route_blocks) -> head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..routing import Route, RoutePlan, resolve_routes, route_blocks
from .layers import embed_flops, final_layer_flops, unpatchify


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class ArchConfig:
    """What every registry backbone's (frozen dataclass) config provides, beyond its fields.

    Fields every config has: ``depth``, ``width``, ``patch_size``, ``input_size``,
    ``in_channels``, ``num_classes``, ``learn_sigma``; anything else (``heads``, ``mlp_ratio``,
    ``d_state``, ...) is the family's own. ``__post_init__`` validates the values and raises
    ``ValueError`` naming the field. The cost model (:mod:`tread.cost`) prices a forward pass as
    ``embed_flops() + sum(block_flops(n) for each block's token count) + head_flops()``.
    """

    family: ClassVar[str] = ""  # registry prefix, e.g. "DiT", "LightningDiT", "Mamba"

    depth: int
    width: int
    patch_size: int
    input_size: int
    in_channels: int
    num_classes: int
    learn_sigma: bool

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        """Tokens per side: input_size / patch_size."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def describe(self) -> str:
        """The size in words for the config header, e.g. ``depth 8, width 128, 4 heads``."""
        return f"depth {self.depth}, width {self.width}"

    def build(
        self,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> RoutableBackbone:
        """The backbone with these hyper-parameters (``generator`` seeds the initial weights)."""
        raise NotImplementedError

    def embed_flops(self) -> int:
        """Forward FLOPs (2 per multiply-add) of ``embed`` for one sample; this default prices
        DiT's stem (:class:`PatchBackbone`): patch projection and timestep MLP."""
        return embed_flops(self.num_tokens, self.in_channels, self.patch_size, self.width)

    def block_flops(self, num_tokens: int) -> int:
        """Forward FLOPs of one block on ``num_tokens`` tokens of one sample."""
        raise NotImplementedError

    def head_flops(self) -> int:
        """Forward FLOPs of ``head`` for one sample; this default prices DiT's FinalLayer."""
        return final_layer_flops(self.num_tokens, self.width, self.patch_size, self.out_channels)


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
    # Scan backbones (Mamba, RWKV) read their tokens as an ordered sequence: routing must keep
    # the kept tokens in their original relative order, whatever ``keep_order`` says.
    scan_order: ClassVar[bool] = False
    # Training-memory option (train.activation_checkpointing): recompute each block's
    # activations in the backward pass instead of keeping them (see route_blocks' checkpoint).
    # A plain attribute, not a buffer: it never reaches the state_dict, so checkpoints of runs
    # with and without it are interchangeable; without grad it has no effect.
    activation_checkpointing: bool = False

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
        self.keep_order = keep_order or self.scan_order
        self.fp32_after_reinsert = fp32_after_reinsert
        self.activation_checkpointing = False

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
            checkpoint=self.activation_checkpointing,
        )
        return self.head(tokens, cond)


class PatchBackbone(RoutableBackbone):
    """A backbone over image patches with DiT's stem and head, shared by every registry family.

    Subclasses set ``config`` (an :class:`ArchConfig`) and create ``patch_embed``,
    ``pos_embed`` (fixed (1, N, D) buffer), ``t_embedder``, ``y_embedder`` and ``final_layer``
    themselves, in their own registration order (seeded initialisation walks the modules in
    that order); their ``embed`` starts from :meth:`stem` and adds what their blocks need in
    ``aux``.
    """

    config: ArchConfig

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def stem(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens with fixed positions added, and the per-sample condition."""
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        cond = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        return tokens, cond

    def head(self, tokens: Tensor, cond: Tensor) -> Tensor:
        out = self.final_layer(tokens, cond)  # (B, N, p*p*C_out)
        return unpatchify(out, self.config.patch_size, self.config.out_channels)
