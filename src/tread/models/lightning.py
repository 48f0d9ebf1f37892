"""LightningDiT (Yao et al., CVPR 2025): a DiT with RMSNorm, SwiGLU, QK-norm and 2-D axial RoPE.

What follows the LightningDiT reference code (hustvl/LightningDiT, read for facts only, through
its copies in stefan-baumann/LightningDiT_TREAD and other mirrors):

- Blocks are DiT's adaLN-Zero blocks (shift, scale, gate for attention and MLP from the
  condition) with ``RMSNorm`` in place of LayerNorm. Its RMSNorm *has* a learned weight
  (initialised to one, eps 1e-6, normalised in float32), in the blocks and in the final layer.
- The MLP is SwiGLU ``W3 (silu(x W1) * x W2)`` with biases and hidden width
  ``int(2/3 * int(mlp_ratio * width))``, not rounded: LightningDiT builds the unfused SwiGLU
  with exactly that width (3072 for XL, 2048 for B, 2730 for L), which keeps the MLP's
  parameters and FLOPs equal to DiT's 4x GELU MLP (three D x 2/3*4D matrices = two D x 4D
  ones). Rounding up to a multiple of 8 (xformers' fused variant) would change L's count.
  Here the gate and value projections are one fused ``D -> 2H`` linear, as in the reference.
- Attention has a qkv bias; QK-norm is an RMSNorm (learned weight, shared by the heads) over
  each head's q and k, applied before the rotation. The released LightningDiT-XL config sets
  ``use_qknorm: false``; here ``qk_norm`` defaults to True (2 * head_dim parameters a block).
- RoPE is EVA-02's 2-D axial form: the first half of each head's channels rotates with the
  token's row, the second half with its column, in adjacent channel pairs (2i, 2i+1), with
  frequencies ``theta^(-4k / head_dim)``, k < head_dim/4, theta = 10000.
- The fixed 2-D sin-cos *absolute* position embedding is still added to the patch tokens
  (LightningDiT keeps DiT's ``x_embedder(x) + pos_embed`` with RoPE on), so it is here too.
- ``learn_sigma`` is False in LightningDiT (velocity prediction), the default here.

Routing: ``embed`` returns each token's RoPE angles as ``aux["rope"]`` (B, N, head_dim/2),
computed from the grid, so ``route_blocks`` gathers them with the tokens and a block inside a
route rotates every kept token by *its own* grid position, in whatever order the tokens come.

Parameters at 32x32x4 inputs, 1000 classes, learn_sigma False, QK-norm on: LightningDiT-B/2
130,336,528; L/2 457,861,104; XL/2 674,928,976 (published LightningDiT-XL: 675M; DiT-XL/2
674,834,720). The /1 sizes are 18k-28k smaller (patch embed and output layer); the released
XL/1 on 16x16x32 VA-VAE latents is 674,965,856.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import Route
from .backbone import ArchConfig, PatchBackbone
from .layers import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_2d,
)

# (depth, width, heads) per size, as DiT's B / L / XL (LightningDiT reuses DiT's sizes).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def registry_entries() -> dict[str, LightningDiTConfig]:
    """The registry's LightningDiT sizes: ``LightningDiT-{S,B,L,XL}/{1,2}``.

    Returns:
        name -> config at the library defaults (32x32x4 inputs, 1000 classes).
    """
    return {
        f"LightningDiT-{size}/{patch}": LightningDiTConfig(
            depth=depth, width=width, heads=heads, patch_size=patch
        )
        for size, (depth, width, heads) in _SIZES.items()
        for patch in (1, 2)
    }


@dataclass(frozen=True)
class LightningDiTConfig(ArchConfig):
    """Architecture hyper-parameters of a LightningDiT (sizes as DiT's)."""

    family: ClassVar[str] = "LightningDiT"

    depth: int
    width: int
    heads: int
    patch_size: int
    input_size: int = 32  # latent (or pixel) side length
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0  # the GELU MLP's ratio; SwiGLU's hidden width is 2/3 of it
    learn_sigma: bool = False  # LightningDiT predicts velocity only
    qk_norm: bool = True  # RMSNorm over each head's q and k (off in LightningDiT's release)
    rope_theta: float = 10000.0  # RoPE base period

    def __post_init__(self) -> None:
        for name in ("depth", "width", "heads", "patch_size", "input_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"LightningDiTConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.num_classes < 0:
            raise ValueError(f"LightningDiTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4, got {self.width}")
        if self.head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head width (width/heads = {self.width}/{self.heads} = "
                f"{self.head_dim}) divisible by 4"
            )
        if self.swiglu_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves no SwiGLU hidden units")
        if not self.rope_theta > 0:
            raise ValueError(f"LightningDiTConfig.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def swiglu_hidden(self) -> int:
        """LightningDiT's ``int(2/3 * int(mlp_ratio * width))``, in integer arithmetic."""
        return 2 * int(self.width * self.mlp_ratio) // 3

    def describe(self) -> str:
        return f"depth {self.depth}, width {self.width}, {self.heads} heads"

    def build(
        self,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> LightningDiT:
        return LightningDiT(
            self,
            routes,
            keep_order=keep_order,
            fp32_after_reinsert=fp32_after_reinsert,
            generator=generator,
        )

    def block_flops(self, num_tokens: int) -> int:
        """Matrix products of one block on ``num_tokens`` tokens of one sample.

        qkv (D -> 3D) and proj (D -> D); SwiGLU's three D x H matrices (gate, value, out);
        attention scores and weighted values (2 x n^2 x D over all heads); adaLN (D -> 6D)
        once per sample. RMSNorm, QK-norm, RoPE, SiLU and the gating are element-wise and
        uncounted, as in ``torch.utils.flop_counter``.
        """
        D, n, H = self.width, num_tokens, self.swiglu_hidden
        linear = 2 * n * D * (3 * D + D + 3 * H)
        attention = 2 * 2 * n * n * D
        modulation = 2 * D * 6 * D
        return linear + attention + modulation


def rope_frequencies(head_dim: int, theta: float, *, device: torch.device | None = None) -> Tensor:
    """Rotation frequencies of one axis of 2-D RoPE (EVA-02 convention).

    Args:
        head_dim: channels per head (divisible by 4: half per axis, in pairs).
        theta: base period.
        device: where to build them.

    Returns:
        (head_dim/4,) float32 frequencies ``theta^(-4k/head_dim)``.
    """
    exponent = torch.arange(head_dim // 4, dtype=torch.float32, device=device) * 4 / head_dim
    return theta**-exponent


def rope_angles(rows: Tensor, cols: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Per-token rotation angles of 2-D axial RoPE from grid coordinates.

    Args:
        rows: (...) row index of each token.
        cols: (...) column index of each token, same shape.
        head_dim: channels per head.
        theta: base period.

    Returns:
        (..., head_dim/2) float32: ``[rows * f | cols * f]``; angle i rotates channel pair
        (2i, 2i+1) of every head, so the first half of a head follows the row, the second the
        column.
    """
    freqs = rope_frequencies(head_dim, theta, device=rows.device)  # (head_dim/4,)
    row_angles = rows.float().unsqueeze(-1) * freqs  # (..., 1) * (head_dim/4,) -> (..., hd/4)
    col_angles = cols.float().unsqueeze(-1) * freqs  # (..., hd/4)
    return torch.cat([row_angles, col_angles], dim=-1)  # (..., head_dim/2)


def grid_coordinates(grid: int, *, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Row and column of each token of a ``grid`` x ``grid`` patch grid in raster order.

    Returns:
        rows, cols: (N,) long each, N = grid^2, token n at (n // grid, n % grid).
    """
    index = torch.arange(grid * grid, device=device)  # (N,)
    return index // grid, index % grid


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate each channel pair (2i, 2i+1) of every head by its token's angle i.

    Rotations by angles a (query) and b (key) leave ``q . k`` a function of a - b only, so
    attention sees relative positions.

    Args:
        x: (B, h, N, head_dim) queries or keys.
        angles: (B, N, head_dim/2) the angles of those N tokens, in the same order.

    Returns:
        (B, h, N, head_dim), dtype of ``x``.
    """
    cos = angles.cos().unsqueeze(1).to(x.dtype)  # (B, N, hd/2) -> (B, 1, N, hd/2)
    sin = angles.sin().unsqueeze(1).to(x.dtype)  # (B, 1, N, hd/2)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, h, N, hd) -> 2 x (B, h, N, hd/2)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2)  # (B, h, N, hd/2, 2) -> (B, h, N, hd)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learned weight, computed in float32
    and returned in the input's dtype (so q, k and v stay one dtype under autocast).

    LightningDiT casts back before multiplying by the weight (which promotes a bf16 input to
    float32); in float32 the two are the same.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return normed.to(x.dtype)


class RopeAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 2-D RoPE from per-token angles."""

    def __init__(self, width: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        """x (B, N, D), rope (B, N, head_dim/2) -> (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, D/h)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, h, N, D/h) -> (B, N, D)
        return self.proj(x)


class SwiGLU(nn.Module):
    """``W3 (silu(x W1) * x W2)``; W1 and W2 are one fused ``D -> 2H`` linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(width, 2 * hidden)  # [gate | value]
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc_in(x).chunk(2, dim=-1)  # (B, N, 2H) -> 2 x (B, N, H)
        return self.fc_out(F.silu(gate) * value)


class LightningDiTBlock(nn.Module):
    """DiT's adaLN-Zero block with RMSNorm, RoPE attention and a SwiGLU MLP."""

    def __init__(self, config: LightningDiTConfig) -> None:
        super().__init__()
        width = config.width
        self.norm1 = RMSNorm(width)
        self.attn = RopeAttention(width, config.heads, config.qk_norm)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, config.swiglu_hidden)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, rope: Tensor) -> Tensor:
        """x (B, N, D), c (B, D), rope (B, N, head_dim/2) -> (B, N, D); N may be the routed K,
        with ``rope`` gathered alongside."""
        mods = self.ada_ln_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class LightningFinalLayer(nn.Module):
    """adaLN-modulated RMSNorm and a linear map to patch pixels: (B,N,D) -> (B,N,p*p*C)."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada_ln_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class LightningDiT(PatchBackbone):
    """Class-conditional LightningDiT on (B, C, H, W) inputs with TREAD routes over its blocks."""

    def __init__(
        self,
        config: LightningDiTConfig,
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
        # Fixed, not learned: a buffer rebuilt at construction, so not part of the checkpoint.
        self.register_buffer("pos_embed", sincos_2d(D, config.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(LightningDiTBlock(config) for _ in range(config.depth))
        self.final_layer = LightningFinalLayer(D, config.patch_size, config.out_channels)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation (Xavier linears, N(0, 0.02) embedders, zeroed adaLN and output)
        plus unit RMSNorm weights, as LightningDiT.

        Every parameter is overwritten here, so with a ``generator`` the initial weights are a
        pure function of its seed.
        """
        g = generator
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=g)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
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

    def rope(self, batch: int, device: torch.device) -> Tensor:
        """RoPE angles of every grid token in raster order, the order ``embed`` returns them.

        Returns:
            (B, N, head_dim/2) float32 (one (N, head_dim/2) table expanded over the batch).
        """
        config = self.config
        rows, cols = grid_coordinates(config.grid, device=device)  # 2 x (N,)
        angles = rope_angles(rows, cols, config.head_dim, config.rope_theta)  # (N, hd/2)
        return angles.unsqueeze(0).expand(batch, -1, -1)  # (N, hd/2) -> (B, N, hd/2)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        tokens, cond = self.stem(x, t, y)  # (B, N, D), (B, D)
        # Token-aligned: routing gathers the angles with the tokens they belong to.
        return tokens, cond, {"rope": self.rope(x.shape[0], x.device)}
