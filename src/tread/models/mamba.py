"""Mamba backbone (DiM / ZigMa style): adaLN-conditioned selective-state-space blocks over patches.

Each block is ``x + gate * mixer(modulate(norm(x), shift, scale))`` with adaLN-Zero (DiT's
conditioning, ZigMa's block); the mixer is Mamba's S6 layer (Gu & Dao 2023): in_proj to x and z,
causal depthwise conv1d, SiLU, x_proj to (dt, B, C), dt_proj + softplus, the selective scan with
A = -exp(A_log) (S4D-real init) and the D skip, then y * SiLU(z) and out_proj. Patch embedding,
fixed sin-cos positions, timestep/label conditioning and the output head are DiT's.

Scan orders (``MambaConfig.scan``):

- ``"bidirectional"`` (Vim / DiM): a forward raster scan and a backward one, summed. The two
  directions have their own conv1d, x_proj, dt_proj, A_log and D (Vim's layout); in_proj and
  out_proj are shared.
- ``"zigzag"`` (ZigMa): one scan per block along a continuous space-filling snake; block i uses
  pattern i mod 8 of :func:`~tread.models.scan.zigzag_keys` (a row snake and a column snake
  from each of the 4 corners).

ROUTING RULE. ``scan_order = True``: routing keeps the kept tokens in their raster order. A block
never assumes its input is the full grid: ``embed`` returns ``aux["pos"]``, the (row, col) of every
token, (B, N, 2) long, which ``route_blocks`` gathers with the tokens. A block ranks its input
tokens by the scan pattern's key of their positions (the token's place in the pattern over the
full grid), scans them in that order and puts the results back in input order. Over the full grid
this is exactly the pattern; over a kept subset it is the pattern restricted to the kept tokens,
consecutive kept tokens adjacent in the scan (not the full grid with holes). Bidirectional over a
kept set is a forward plus a backward scan over the kept tokens only.
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
from .scan import SCANS, grid_positions, scan_orders, selective_scan


@dataclass(frozen=True)
class MambaConfig(ArchConfig):
    """Architecture hyper-parameters of a Mamba backbone (sizes: :func:`registry_entries`)."""

    family: ClassVar[str] = "Mamba"

    depth: int
    width: int  # D, the residual width
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = False
    d_state: int = 16  # N, SSM states per inner channel
    expand: int = 2  # inner width E = expand * width
    d_conv: int = 4  # causal depthwise conv kernel
    scan: str = "bidirectional"  # ScanName

    def __post_init__(self) -> None:
        names = ("depth", "width", "patch_size", "input_size", "in_channels")
        for name in (*names, "d_state", "expand", "d_conv"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"MambaConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4, got {self.width}")
        if self.scan not in SCANS:
            raise ValueError(f"MambaConfig.scan must be one of {SCANS}, got {self.scan!r}")

    @property
    def inner(self) -> int:
        """E, the mixer's inner width."""
        return self.expand * self.width

    @property
    def dt_rank(self) -> int:
        """R, the rank of the step-size projection: ceil(width / 16), as in Mamba."""
        return math.ceil(self.width / 16)

    @property
    def directions(self) -> int:
        """Scans per block: 2 for bidirectional, 1 for zigzag."""
        return 2 if self.scan == "bidirectional" else 1

    def describe(self) -> str:
        return f"depth {self.depth}, width {self.width}, {self.scan} scan, d_state {self.d_state}"

    def build(
        self,
        routes: Sequence[Route] = (),
        *,
        keep_order: bool = False,
        fp32_after_reinsert: bool = False,
        generator: torch.Generator | None = None,
    ) -> Mamba:
        return Mamba(
            self,
            routes,
            keep_order=keep_order,
            fp32_after_reinsert=fp32_after_reinsert,
            generator=generator,
        )

    def matmul_flops(self, num_tokens: int) -> int:
        """The linear and convolution FLOPs of one block (what a FLOP counter counts).

        Per sample: adaLN (D -> 3D), in_proj (D -> 2E), out_proj (E -> D) and, per direction,
        the depthwise conv (d_conv MACs per token and channel), x_proj (E -> R + 2N) and dt_proj
        (R -> E).
        """
        n, D, E = num_tokens, self.width, self.inner
        R, N = self.dt_rank, self.d_state
        modulation = 2 * D * 3 * D
        projections = 2 * n * D * 2 * E + 2 * n * E * D
        per_direction = 2 * n * E * self.d_conv + 2 * n * E * (R + 2 * N) + 2 * n * R * E
        return modulation + projections + self.directions * per_direction

    def scan_flops(self, num_tokens: int) -> int:
        """The selective scan's element-wise FLOPs of one block (no FLOP counter sees them).

        Per token, channel and state (``scan.selective_scan_reference`` op by op): delta * A,
        its exp, (delta * u) * B, decay * h, + drive, C * h, and the sum over states (N - 1
        adds, plus 1 for the skip): 7 * N. Per token and channel: delta * u and D * u: 2. So
        (7 N + 2) per token and inner channel, for each direction. Gating, softplus and SiLU are
        ignored like every other activation.
        """
        return self.directions * num_tokens * self.inner * (7 * self.d_state + 2)

    def block_flops(self, num_tokens: int) -> int:
        """Forward FLOPs of one block: :meth:`matmul_flops` + :meth:`scan_flops`."""
        return self.matmul_flops(num_tokens) + self.scan_flops(num_tokens)


class SelectiveSSM(nn.Module):
    """One scan direction of the mixer: causal conv1d, SiLU, input-dependent (dt, B, C), S6 scan.

    A plain 1-D sequence map (B, L, E) -> (B, L, E): it scans its input in the given order.
    """

    def __init__(self, inner: int, d_state: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.d_conv = d_conv
        self.conv1d = nn.Conv1d(inner, inner, kernel_size=d_conv, groups=inner)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, E) in scan order -> (B, L, E); output t depends on inputs 0..t only."""
        x = x.transpose(1, 2)  # (B, L, E) -> (B, E, L)
        x = F.silu(self.conv1d(F.pad(x, (self.d_conv - 1, 0))))  # left pad: causal, (B, E, L)
        params = self.x_proj(x.transpose(1, 2))  # (B, L, E) -> (B, L, R + 2N)
        dt, B, C = params.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (B, L, R) -> (B, L, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        y = selective_scan(
            x,
            delta.transpose(1, 2),  # (B, L, E) -> (B, E, L)
            A,
            B.transpose(1, 2),  # (B, L, N) -> (B, N, L)
            C.transpose(1, 2),  # (B, L, N) -> (B, N, L)
            self.D.float(),
        )
        return y.transpose(1, 2)  # (B, E, L) -> (B, L, E)


class MambaMixer(nn.Module):
    """Mamba's S6 mixer with one :class:`SelectiveSSM` per scan direction, outputs summed."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        E = config.inner
        self.in_proj = nn.Linear(config.width, 2 * E, bias=False)
        self.ssms = nn.ModuleList(
            SelectiveSSM(E, config.d_state, config.d_conv, config.dt_rank)
            for _ in range(config.directions)
        )
        self.out_proj = nn.Linear(E, config.width, bias=False)

    def forward(self, x: Tensor, orders: Sequence[Tensor]) -> Tensor:
        """Mix x (B, K, D) along the given scan orders (one (B, K) permutation per direction).

        Returns:
            (B, K, D) in the input order.
        """
        batch, tokens, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, K, 2E) -> 2 x (B, K, E)
        rows = u.reshape(batch * tokens, -1)  # (B, K, E) -> (B*K, E)
        # Row offsets turn per-sample orders into indices of the flattened rows: index_select
        # copies whole rows, much faster than a gather with an index expanded over E.
        offsets = torch.arange(batch, device=x.device).unsqueeze(1) * tokens  # (B, 1)
        y = torch.zeros_like(u)
        for ssm, order in zip(self.ssms, orders, strict=True):
            to_scan = (order + offsets).flatten()  # (B, K) -> (B*K,)
            to_input = (order.argsort(dim=1) + offsets).flatten()  # the inverse permutation
            scanned = ssm(rows.index_select(0, to_scan).view_as(u))  # scan order, (B, K, E)
            y = y + scanned.reshape(batch * tokens, -1).index_select(0, to_input).view_as(u)
        return self.out_proj(y * F.silu(z))  # (B, K, E) -> (B, K, D)


class MambaBlock(nn.Module):
    """adaLN-Zero Mamba block: x + gate * mixer(modulate(norm(x), shift, scale))."""

    def __init__(self, config: MambaConfig, index: int) -> None:
        super().__init__()
        self.index = index  # depth index: selects the zigzag pattern
        self.grid = config.grid
        self.scan = config.scan
        self.norm = nn.LayerNorm(config.width, elementwise_affine=False, eps=1e-6)
        self.mixer = MambaMixer(config)
        self.ada_ln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.width, 3 * config.width))

    def forward(self, x: Tensor, c: Tensor, pos: Tensor) -> Tensor:
        """x (B, K, D), c (B, D), pos (B, K, 2) long (row, col) -> (B, K, D); K may be < N."""
        shift, scale, gate = self.ada_ln_modulation(c).chunk(3, dim=1)  # 3 x (B, D)
        orders = scan_orders(pos, self.grid, self.scan, self.index)
        return x + gate.unsqueeze(1) * self.mixer(modulate(self.norm(x), shift, scale), orders)


class Mamba(PatchBackbone):
    """Class-conditional Mamba on (B, C, H, W) inputs with TREAD routes over its blocks."""

    scan_order: ClassVar[bool] = True

    def __init__(
        self,
        config: MambaConfig,
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
        # Fixed, not learned, not in the checkpoint; added to the tokens in embed, so it follows
        # them through routing like any token content.
        self.register_buffer("pos_embed", sincos_2d(D, config.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(MambaBlock(config, index) for index in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation for the DiT parts, Mamba's for the SSM; adaLN and output zeroed.

        Linears: Xavier-uniform, zero bias (DiT). Embedders: N(0, 0.02). SSM (Mamba defaults):
        conv1d U(+-1/sqrt(d_conv)) (PyTorch's default for a depthwise kernel); dt_proj weight
        U(+-R^-0.5) and bias softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1]; A_log =
        log(1..N) per channel (S4D-real: A = -(1..N)); D = 1. Every parameter is overwritten, so
        with a ``generator`` the initial weights are a pure function of its seed.
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
        for block in self.blocks:
            for ssm in block.mixer.ssms:
                _init_ssm(ssm, g)
            nn.init.zeros_(block.ada_ln_modulation[-1].weight)
            nn.init.zeros_(block.ada_ln_modulation[-1].bias)
        for layer in (self.final_layer.ada_ln_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        tokens, cond = self.stem(x, t, y)  # (B, N, D), (B, D)
        pos = grid_positions(self.config.grid, device=x.device)  # (N, 2)
        # Token-aligned, so routing gathers it with the tokens: (N, 2) -> (B, N, 2)
        return tokens, cond, {"pos": pos.expand(x.shape[0], -1, -1)}


def _init_ssm(
    ssm: SelectiveSSM,
    generator: torch.Generator | None,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_floor: float = 1e-4,
) -> None:
    """Mamba's initialisation of one scan direction (see :meth:`Mamba.reset_parameters`)."""
    bound = 1.0 / math.sqrt(ssm.d_conv)
    nn.init.uniform_(ssm.conv1d.weight, -bound, bound, generator=generator)
    nn.init.uniform_(ssm.conv1d.bias, -bound, bound, generator=generator)
    bound = ssm.dt_rank**-0.5
    nn.init.uniform_(ssm.dt_proj.weight, -bound, bound, generator=generator)
    with torch.no_grad():
        unit = torch.rand(
            ssm.dt_proj.bias.shape, generator=generator, device=ssm.dt_proj.bias.device
        )
        dt = torch.exp(unit * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        ssm.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        states = torch.arange(1, ssm.d_state + 1, dtype=torch.float32, device=ssm.A_log.device)
        ssm.A_log.copy_(torch.log(states).expand_as(ssm.A_log))  # (N,) -> (E, N)
        ssm.D.fill_(1.0)


# Per size: (depth, width). Widths follow DiT's S/B/L; the depth is set so that Mamba-B/2 with
# the default bidirectional scan has the TREAD paper's 111M parameters (Table 2, "Mamba 111M") at
# 32x32x4: a Mamba block holds about half a DiT block's parameters (9 D^2 vs 18 D^2 with adaLN),
# so at width 768 it takes 19 blocks. L doubles B's depth, as DiT-L does. ZigMa's published
# config (width 768, depth 24, one scan per block) would be 136M here.
# Parameters (learn_sigma=False, bidirectional, /2): S 29.2M, B 112.5M, L 391.7M.
_SIZES = {"S": (19, 384), "B": (19, 768), "L": (38, 1024)}


def registry_entries() -> dict[str, MambaConfig]:
    """``Mamba-{S,B,L}/{2,4}``: the default scan is bidirectional; ``scan="zigzag"`` overrides."""
    return {
        f"Mamba-{size}/{patch}": MambaConfig(depth=depth, width=width, patch_size=patch)
        for size, (depth, width) in _SIZES.items()
        for patch in (2, 4)
    }
