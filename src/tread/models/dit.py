"""DiT (Peebles & Xie 2023): adaLN-Zero transformer blocks over latent patches. SiT = same net."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..routing import Route
from .backbone import ArchConfig, PatchBackbone
from .layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_2d,
)


@dataclass(frozen=True)
class DiTConfig(ArchConfig):
    """Architecture hyper-parameters of a DiT (the registry's values follow the DiT paper)."""

    family: ClassVar[str] = "DiT"

    depth: int
    width: int
    heads: int
    patch_size: int
    input_size: int = 32  # latent (or pixel) side length
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    learn_sigma: bool = False  # DiT's learned variance doubles the output channels

    def __post_init__(self) -> None:
        for name in ("depth", "width", "heads", "patch_size", "input_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4, got {self.width}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def describe(self) -> str:
        return f"depth {self.depth}, width {self.width}, {self.heads} heads"

    def build(
        self,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> DiT:
        return DiT(
            self,
            routes,
            keep_order=keep_order,
            fp32_after_reinsert=fp32_after_reinsert,
            generator=generator,
        )

    def block_flops(self, num_tokens: int) -> int:
        D, n = self.width, num_tokens
        linear = 2 * n * D * (3 * D + D + 2 * self.mlp_hidden)  # qkv, proj, fc1, fc2
        attention = 2 * 2 * n * n * D  # scores Q K^T and weighted values, over all heads
        modulation = 2 * D * 6 * D  # adaLN: one (D -> 6D) linear per sample
        return linear + attention + modulation


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, both modulated and gated by adaLN-Zero from the condition."""

    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_hidden)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, D), c (B, D) -> (B, N, D); N may be the routed count K."""
        mods = self.ada_ln_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class DiT(PatchBackbone):
    """Class-conditional DiT on (B, C, H, W) inputs with TREAD routes over its blocks."""

    def __init__(
        self,
        config: DiTConfig,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            routes,
            depth=config.depth,
            keep_order=keep_order,
            fp32_after_reinsert=fp32_after_reinsert,
        )
        self.config = config
        D = config.width
        self.patch_embed = PatchEmbed(config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        grid = config.input_size // config.patch_size
        # Fixed, not learned: a buffer rebuilt at construction, so not part of the checkpoint.
        self.register_buffer("pos_embed", sincos_2d(D, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.heads, config.mlp_hidden) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embedders, zeroed adaLN and output.

        Every parameter is overwritten here, so with a ``generator`` the initial weights are a
        pure function of its seed.
        """
        g = generator
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=g)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        # Like a linear on flattened patches: (D, C, p, p) viewed as (D, C*p*p).
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1), generator=g)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=g)
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln_modulation[-1].weight)
            nn.init.zeros_(block.ada_ln_modulation[-1].bias)
        for layer in (self.final_layer.ada_ln_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        tokens, cond = self.stem(x, t, y)  # (B, N, D), (B, D)
        # Positions are already added to the tokens, so gather/scatter needs no side tensors.
        return tokens, cond, {}
