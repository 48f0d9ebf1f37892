"""Shared building blocks of DiT-style backbones: embedders, attention, MLP, adaLN, patches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (B, N, D), shift/scale (B, D) -> (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(width: int, grid: int, *, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT convention): (grid*grid, width).

    Half of the channels encode the row, half the column; each half is [sin | cos] over
    width/4 frequencies 1/10000^(k/(width/4)). Tokens are in raster order (row-major).
    """
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for 2-D sin-cos positions, got {width}")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    coords = torch.arange(grid, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs  # (grid*grid, 1) * (quarter,) -> (grid*grid, quarter)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid*grid, width/2)

    # DiT puts the column (w) encoding first, then the row (h) encoding.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (grid*grid, width)


class PatchEmbed(nn.Module):
    """Split an image into p x p patches and project each to ``width``: (B,C,H,W) -> (B,N,D)."""

    def __init__(self, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # -> (B, N, D), raster order


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time (B,) followed by a two-layer MLP -> (B, D)."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def features(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
        freqs = torch.exp(-math.log(self.max_period) * exponent)  # (half,)
        angles = t.float().unsqueeze(1) * freqs.unsqueeze(0)  # (B, 1) * (1, half) -> (B, half)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, freq_dim)

    def forward(self, t: Tensor) -> Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(self.features(t).to(weight_dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D); index ``num_classes`` is the null label for guidance.

    Label dropout is the trainer's job (it replaces labels by the null label with a seeded
    generator), so the module itself is deterministic.
    """

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, h, N, D/h) -> (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-GELU, as in DiT."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels: (B,N,D) -> (B,N,p*p*C)."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada_ln_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a square grid of N patches in raster order."""
    B, N, _ = x.shape
    grid = math.isqrt(N)
    p = patch_size
    x = x.view(B, grid, grid, p, p, channels)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # -> (B, C, h, p, w, p)
    return x.reshape(B, channels, grid * p, grid * p)  # -> (B, C, H, W)


def embed_flops(num_tokens: int, in_channels: int, patch_size: int, width: int) -> int:
    """Forward FLOPs of the DiT-style embed for one sample: the patch projection plus the
    timestep MLP (256 -> D -> D); label lookup and position adds are free."""
    patch = 2 * num_tokens * in_channels * patch_size * patch_size * width
    return patch + 2 * (256 * width + width * width)


def final_layer_flops(num_tokens: int, width: int, patch_size: int, out_channels: int) -> int:
    """Forward FLOPs of :class:`FinalLayer` for one sample: adaLN (D -> 2D) and the output
    linear."""
    return 2 * width * 2 * width + 2 * num_tokens * width * patch_size * patch_size * out_channels
