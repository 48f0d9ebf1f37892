"""Diffusion-RWKV (Fei et al. 2024): adaLN-Zero Bi-RWKV blocks over latent patches.

Each block is DiT's adaLN-Zero block with attention replaced by Vision-RWKV's spatial mix (a
bidirectional WKV, :mod:`tread.models.wkv`, gated by a sigmoid receptance) and the MLP by
RWKV's channel mix (squared-ReLU key, sigmoid receptance). Embedding (patches, fixed 2-D
sin-cos positions, timestep + label conditioning) and the output layer are DiT's.
Diffusion-RWKV's long skip connections (U-ViT style) are left out: a skip from a block before
a route into one inside it would need its own routing rule, and TREAD routes a plain stack.

Token shift. RWKV mixes each token with its neighbours before the linears. Vision-RWKV's
quad-directional shift reads the up/down/left/right neighbours on the full 2-D grid, which does
not exist inside a route. This module shifts along the 1-D sequence instead, both ways: the
first half of the channels comes from the previous token, the second half from the next one,
and zeros enter at the two ends. That is defined for any sequence, including a single token.

ROUTING RULE. Everything order-dependent in a block is measured in the sequence the block is
given, never on the full grid. Under a TREAD route a block sees the K kept tokens in raster
order (``RWKV.scan_order = True`` makes routing sort the kept indices), and then

* the token shift takes the previous / next *kept* token (zeros at the ends of the kept
  sequence), however far apart they are on the grid;
* the WKV distance |t - i| is the distance in the kept sequence, normalised by T = K (the kept
  count), so ``w`` keeps meaning "total decay across the sequence".

Grid positions reach the blocks only through the sin-cos embedding added in ``embed``, which
travels with the tokens, so no ``aux`` tensor is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import Route
from .backbone import ArchConfig, PatchBackbone
from .layers import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_2d,
)
from .wkv import bi_wkv


@dataclass(frozen=True)
class RWKVConfig(ArchConfig):
    """Architecture hyper-parameters of a Diffusion-RWKV backbone (per-channel WKV, no heads)."""

    family: ClassVar[str] = "RWKV"

    depth: int
    width: int
    patch_size: int
    input_size: int = 32  # latent (or pixel) side length
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = False  # DiT's learned variance doubles the output channels
    mlp_ratio: float = 4.0  # channel-mix hidden width over width

    def __post_init__(self) -> None:
        for name in ("depth", "width", "patch_size", "input_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"RWKVConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"RWKVConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"RWKVConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4, got {self.width}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def build(
        self,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> RWKV:
        return RWKV(
            self,
            routes,
            keep_order=keep_order,
            fp32_after_reinsert=fp32_after_reinsert,
            generator=generator,
        )

    def block_flops(self, num_tokens: int) -> int:
        """Forward FLOPs of one block on ``num_tokens`` (T) tokens of one sample.

        Linears (2 FLOPs per multiply-add, as ``torch.utils.flop_counter`` counts them):
        time mix key, value, receptance, output (4 D^2 per token), channel mix key and value
        (2 D H) and receptance (D^2), adaLN (D -> 6D, once per sample).

        WKV: :func:`~tread.models.wkv.bi_wkv` (the implementation that runs, on every device)
        multiplies a (T, T) decay matrix per channel with the exp-weighted values and with the
        weights alone, stacked: one ``bmm`` of 2 T^2 multiply-adds per channel and sample, i.e.
        4 T^2 D FLOPs, which the counter counts. Its element-wise work is not counted, as
        for DiT's softmax: the decay matrix (about 5 T^2 D operations per *batch*, not per
        sample), exp / scale of the keys and the division (about 6 T D per sample), token shift
        and mixing (about 9 T D), sigmoid gates and squared ReLU (about T (2D + 2H)). So the
        figure here matches the counter exactly; the recurrent Bi-WKV kernels of Vision-RWKV
        would do O(T D) instead of 4 T^2 D for this term.
        """
        D, H, n = self.width, self.mlp_hidden, num_tokens
        time_mix = 2 * n * 4 * D * D  # key, value, receptance, output
        wkv = 4 * n * n * D  # numerator and denominator bmm
        channel_mix = 2 * n * (2 * D * H + D * D)  # key, value, receptance
        modulation = 2 * D * 6 * D  # adaLN: one (D -> 6D) linear per sample
        return time_mix + wkv + channel_mix + modulation


def token_shift(x: Tensor) -> Tensor:
    """Bidirectional 1-D token shift: half the channels from the previous token, half from the
    next, zeros at the sequence ends (Vision-RWKV's shift, in one dimension).

    Args:
        x: (B, T, D) tokens in sequence order, any T >= 1.

    Returns:
        (B, T, D): ``out[:, t, :D/2] = x[:, t-1, :D/2]`` (0 at t = 0) and
        ``out[:, t, D/2:] = x[:, t+1, D/2:]`` (0 at t = T-1).
    """
    half = x.shape[2] // 2
    from_previous = F.pad(x[:, :-1, :half], (0, 0, 1, 0))  # (B, T-1, D/2) -> (B, T, D/2)
    from_next = F.pad(x[:, 1:, half:], (0, 0, 0, 1))  # (B, T-1, D - D/2) -> (B, T, D - D/2)
    return torch.cat([from_previous, from_next], dim=2)  # (B, T, D)


class TimeMix(nn.Module):
    """Vision-RWKV's spatial mix: token shift, k/v/r linears, Bi-WKV, sigmoid gate, output.

    ``decay`` (w) and ``bonus`` (u) are the per-channel WKV parameters; ``mix_*`` interpolate
    each channel between the token (1) and its shifted neighbour (0).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.zeros(width))
        self.bonus = nn.Parameter(torch.zeros(width))
        self.mix_k = nn.Parameter(torch.zeros(width))
        self.mix_v = nn.Parameter(torch.zeros(width))
        self.mix_r = nn.Parameter(torch.zeros(width))
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.receptance = nn.Linear(width, width, bias=False)
        self.output = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) in sequence order -> (B, T, D)."""
        shifted = token_shift(x)
        k = self.key(torch.lerp(shifted, x, self.mix_k))  # (B, T, D)
        v = self.value(torch.lerp(shifted, x, self.mix_v))
        r = torch.sigmoid(self.receptance(torch.lerp(shifted, x, self.mix_r)))
        return self.output(r * bi_wkv(self.decay, self.bonus, k, v))


class ChannelMix(nn.Module):
    """RWKV's channel mix: token shift, squared-ReLU key MLP, gated by a sigmoid receptance."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.mix_k = nn.Parameter(torch.zeros(width))
        self.mix_r = nn.Parameter(torch.zeros(width))
        self.key = nn.Linear(width, hidden, bias=False)
        self.value = nn.Linear(hidden, width, bias=False)
        self.receptance = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) in sequence order -> (B, T, D)."""
        shifted = token_shift(x)
        k = torch.relu(self.key(torch.lerp(shifted, x, self.mix_k))).square()  # (B, T, H)
        r = torch.sigmoid(self.receptance(torch.lerp(shifted, x, self.mix_r)))  # (B, T, D)
        return r * self.value(k)


class RWKVBlock(nn.Module):
    """Pre-norm time mix + channel mix, both modulated and gated by adaLN-Zero (as DiT)."""

    def __init__(self, width: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.time_mix = TimeMix(width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.channel_mix = ChannelMix(width, mlp_hidden)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, T, D) in sequence order, c (B, D) -> (B, T, D); T may be the routed count K."""
        mods = self.ada_ln_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_t, scale_t, gate_t, shift_c, scale_c, gate_c = mods
        x = x + gate_t.unsqueeze(1) * self.time_mix(modulate(self.norm1(x), shift_t, scale_t))
        x = x + gate_c.unsqueeze(1) * self.channel_mix(modulate(self.norm2(x), shift_c, scale_c))
        return x


def rwkv_channel_init(layer: int, depth: int, width: int) -> dict[str, Tensor]:
    """Vision-RWKV's deterministic per-channel initialisation ("fancy" init) for one block.

    Decays spread over [-5, 3] across the channels (deeper layers bend the curve towards
    -5), bonuses log(0.3) with a +-0.5 zigzag, and shift mixes that rise over the channels
    (deeper layers take less of the neighbour).

    Args:
        layer: block index, 0-based.
        depth: number of blocks.
        width: D.

    Returns:
        Tensors of shape (D,) named after the block's parameters: ``time_mix.decay``,
        ``time_mix.bonus``, ``time_mix.mix_{k,v,r}``, ``channel_mix.mix_{k,r}``.
    """
    depth_ratio = layer / (depth - 1) if depth > 1 else 0.0  # 0 at the first block, 1 at the last
    keep_ratio = 1.0 - layer / depth  # 1 at the first block, towards 0 at the last
    channel = torch.arange(width, dtype=torch.float64)
    spread = channel / max(width - 1, 1)  # 0 .. 1
    fraction = channel / width  # 0 .. (D-1)/D
    zigzag = 0.5 * ((channel + 1) % 3 - 1)  # 0, 0.5, -0.5, 0, 0.5, ...
    mix = fraction**keep_ratio
    values = {
        "time_mix.decay": -5 + 8 * spread ** (0.7 + 1.3 * depth_ratio),
        "time_mix.bonus": math.log(0.3) + zigzag,
        "time_mix.mix_k": mix,
        "time_mix.mix_v": mix + 0.3 * depth_ratio,
        "time_mix.mix_r": fraction ** (0.5 * keep_ratio),
        "channel_mix.mix_k": mix,
        "channel_mix.mix_r": mix,
    }
    return {name: value.float() for name, value in values.items()}


class RWKV(PatchBackbone):
    """Class-conditional Diffusion-RWKV on (B, C, H, W) inputs with TREAD routes over its blocks.

    A scan backbone: routing keeps the kept tokens in raster order (see the module docstring
    for the routing rule).
    """

    scan_order: ClassVar[bool] = True

    def __init__(
        self,
        config: RWKVConfig,
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
        self.blocks = nn.ModuleList(RWKVBlock(D, config.mlp_hidden) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation for the linears and embedders (Xavier, N(0, 0.02), zeroed adaLN
        and output) and Vision-RWKV's deterministic per-channel WKV and shift parameters.

        Every parameter is overwritten here, so with a ``generator`` the initial weights are a
        pure function of its seed.
        """
        g = generator
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        # Like a linear on flattened patches: (D, C, p, p) viewed as (D, C*p*p).
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1), generator=g)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=g)
        depth, width = self.config.depth, self.config.width
        with torch.no_grad():
            for layer, block in enumerate(self.blocks):
                for name, value in rwkv_channel_init(layer, depth, width).items():
                    block.get_parameter(name).copy_(value)
                nn.init.zeros_(block.ada_ln_modulation[-1].weight)
                nn.init.zeros_(block.ada_ln_modulation[-1].bias)
        for layer in (self.final_layer.ada_ln_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        tokens, cond = self.stem(x, t, y)  # (B, N, D) in raster order, (B, D)
        # Positions are added to the tokens, so gather/scatter needs no side tensors.
        return tokens, cond, {}


# Sizes (depth, width) per preset; parameters at 32x32x4 inputs, patch 2, 1000 classes,
# learn_sigma=True (as the DiT/TREAD tables count them). B sits near TREAD Table 2's "RWKV
# 210M"; S and L take DiT-S's and DiT-L's depth and width (each block has ~19 D^2 weights vs
# DiT's 18 D^2). Diffusion-RWKV's own presets (e.g. 384 x 13 for S, 768 x 37 for L) add long
# skips and are not reproduced.
RWKV_SIZES = {"S": (12, 384), "B": (18, 768), "L": (24, 1024)}


def registry_entries() -> dict[str, RWKVConfig]:
    """The registry's RWKV entries: ``RWKV-{S,B,L}/2`` (see :data:`RWKV_SIZES`)."""
    return {
        f"RWKV-{size}/2": RWKVConfig(depth=depth, width=width, patch_size=2)
        for size, (depth, width) in RWKV_SIZES.items()
    }
