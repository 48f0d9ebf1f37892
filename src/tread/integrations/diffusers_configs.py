"""Sizes of diffusers transformers for benchmarks, and the real inputs of one training step.

``tread bench --diffusers dit-s flux-s`` times a routed vs plain training step of these models
(see :func:`tread.bench.benchmark_diffusers`). The models are built from their constructors with
random weights: nothing is downloaded. The names read like tread's registry (``-s`` ≈ DiT-S/2's
width and depth, ``-b`` ≈ DiT-B/2's, ``dit-xl`` = the published DiT-XL/2-256 transformer shape);
``*-tiny`` are for tests.

Like :mod:`tread.integrations.diffusers`, importing this module does not import diffusers; only
:func:`build_diffusers_model` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Family = Literal["dit", "flux"]

#: The diffusers class of each family.
FAMILY_CLASSES: dict[str, str] = {
    "dit": "DiTTransformer2DModel",
    "flux": "FluxTransformer2DModel",
}


@dataclass(frozen=True)
class DiffusersConfig:
    """A diffusers transformer's size and the shape of its training inputs.

    Attributes:
        family: "dit" (``DiTTransformer2DModel``, class-conditional) or "flux"
            (``FluxTransformer2DModel``, text-conditional, rotary positions).
        num_layers: DiT blocks; Flux double-stream blocks.
        heads: attention heads.
        head_dim: width of one head (the model width is heads * head_dim).
        latent_size: side of the input grid. DiT: the latent image (C, S, S) before patching;
            Flux: the grid of packed latent tokens (Flux packs 2x2 latent patches before the
            model, so 16 means a 32x32 latent), one token per cell.
        in_channels: latent channels (Flux: packed, 4 x the latent's).
        patch_size: DiT's patch side (Flux: tokens are already packed, always 1).
        num_classes: DiT's class count (``num_embeds_ada_norm``); labels are 0..num_classes-1.
        single_layers: Flux single-stream blocks (run after the double-stream ones).
        text_tokens: Flux text tokens; they join every block's attention and never skip.
        text_dim: Flux text-embedding width (``joint_attention_dim``).
        pooled_dim: Flux pooled text-embedding width (``pooled_projection_dim``).
        rope_axes: Flux ``axes_dims_rope``; must sum to ``head_dim``.
    """

    family: Family
    num_layers: int
    heads: int
    head_dim: int
    latent_size: int
    in_channels: int
    patch_size: int = 2
    num_classes: int = 1000
    single_layers: int = 0
    text_tokens: int = 0
    text_dim: int = 0
    pooled_dim: int = 0
    rope_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in get_args(Family):
            raise ConfigError(
                f"DiffusersConfig.family must be one of {', '.join(get_args(Family))}, "
                f"got {self.family!r}"
            )
        for key in ("num_layers", "heads", "head_dim", "latent_size", "in_channels", "patch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"DiffusersConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.latent_size % self.patch_size:
            raise ConfigError(
                f"DiffusersConfig.latent_size={self.latent_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.family == "flux":
            if self.patch_size != 1:
                raise ConfigError("DiffusersConfig.patch_size must be 1 for flux (packed tokens)")
            if min(self.text_tokens, self.text_dim, self.pooled_dim) < 1:
                raise ConfigError("DiffusersConfig: flux needs text_tokens, text_dim, pooled_dim")
            if len(self.rope_axes) != 3 or sum(self.rope_axes) != self.head_dim:
                raise ConfigError(
                    f"DiffusersConfig.rope_axes={self.rope_axes} must be 3 sizes summing to "
                    f"head_dim={self.head_dim}"
                )

    @property
    def model_class(self) -> str:
        """Name of the diffusers class."""
        return FAMILY_CLASSES[self.family]

    @property
    def depth(self) -> int:
        """Blocks a route counts across (Flux: double-stream, then single-stream)."""
        return self.num_layers + self.single_layers

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample: the only tokens a route may skip."""
        return (self.latent_size // self.patch_size) ** 2


#: Benchmark sizes by name. ``dit-s`` / ``flux-s`` are the CPU figures' models.
DIFFUSERS_CONFIGS: dict[str, DiffusersConfig] = {
    # 12 blocks, width 384, 256 tokens of a 32x32x4 latent: DiT-S/2's shape.
    "dit-s": DiffusersConfig(
        "dit", num_layers=12, heads=6, head_dim=64, latent_size=32, in_channels=4
    ),
    # 12 blocks, width 768: DiT-B/2's shape.
    "dit-b": DiffusersConfig(
        "dit", num_layers=12, heads=12, head_dim=64, latent_size=32, in_channels=4
    ),
    # The published DiT-XL/2-256 transformer (28 blocks, 16 heads x 72), without learned sigma.
    "dit-xl": DiffusersConfig(
        "dit", num_layers=28, heads=16, head_dim=72, latent_size=32, in_channels=4
    ),
    # 4 double + 8 single blocks, width 384; 256 image tokens (a 32x32x4 latent packed 2x2)
    # beside 32 text tokens.
    "flux-s": DiffusersConfig(
        "flux",
        num_layers=4,
        heads=6,
        head_dim=64,
        latent_size=16,
        in_channels=16,
        patch_size=1,
        single_layers=8,
        text_tokens=32,
        text_dim=256,
        pooled_dim=256,
        rope_axes=(16, 24, 24),
    ),
    # 6 double + 12 single blocks, width 768.
    "flux-b": DiffusersConfig(
        "flux",
        num_layers=6,
        heads=12,
        head_dim=64,
        latent_size=16,
        in_channels=16,
        patch_size=1,
        single_layers=12,
        text_tokens=64,
        text_dim=768,
        pooled_dim=768,
        rope_axes=(16, 24, 24),
    ),
    # Tests: 4 blocks, 16 image tokens.
    "dit-tiny": DiffusersConfig(
        "dit", num_layers=4, heads=2, head_dim=8, latent_size=8, in_channels=4, num_classes=10
    ),
    "flux-tiny": DiffusersConfig(
        "flux",
        num_layers=2,
        heads=2,
        head_dim=16,
        latent_size=4,
        in_channels=8,
        patch_size=1,
        single_layers=2,
        text_tokens=5,
        text_dim=32,
        pooled_dim=32,
        rope_axes=(4, 6, 6),
    ),
}


def diffusers_config(name: str) -> DiffusersConfig:
    """The registered config ``name``.

    Raises:
        ConfigError: an unknown name; the message lists the known ones.
    """
    if name not in DIFFUSERS_CONFIGS:
        raise ConfigError(
            f"unknown diffusers config {name!r}; known: {', '.join(DIFFUSERS_CONFIGS)}"
        )
    return DIFFUSERS_CONFIGS[name]


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ConfigError(
            f"diffusers models need diffusers, which is not installed ({err}); "
            "install it with: pip install 'tread[diffusers]'"
        ) from None
    return diffusers


def build_diffusers_model(config: DiffusersConfig) -> nn.Module:
    """A randomly initialised diffusers transformer of ``config``'s size (global RNG).

    Args:
        config: the size.

    Returns:
        ``DiTTransformer2DModel`` or ``FluxTransformer2DModel`` on the CPU, in train mode.
    """
    diffusers = _diffusers()
    if config.family == "dit":
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=config.heads,
            attention_head_dim=config.head_dim,
            in_channels=config.in_channels,
            out_channels=config.in_channels,  # no learned variance channels
            num_layers=config.num_layers,
            sample_size=config.latent_size,
            patch_size=config.patch_size,
            num_embeds_ada_norm=config.num_classes,
        )
    else:
        model = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=config.in_channels,
            num_layers=config.num_layers,
            num_single_layers=config.single_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.heads,
            joint_attention_dim=config.text_dim,
            pooled_projection_dim=config.pooled_dim,
            axes_dims_rope=tuple(config.rope_axes),
        )
    return model.train()


def flux_image_ids(side: int, *, device: torch.device | str = "cpu") -> Tensor:
    """Flux's image position ids: (side * side, 3) rows ``(0, row, col)`` in raster order."""
    rows, cols = torch.meshgrid(
        torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij"
    )  # 2 x (S, S)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (S, S, 3)
    return ids.reshape(side * side, 3).float()  # (S, S, 3) -> (N, 3)


def training_inputs(
    config: DiffusersConfig,
    batch: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], Tensor]:
    """Random inputs of one training step and a random regression target.

    DiT gets latents (B, C, S, S), integer timesteps in [0, 1000) and class labels; Flux gets
    packed latents (B, N, C), timesteps in [0, 1) (Flux scales them by 1000 itself), text
    embeddings (B, T, text_dim), pooled embeddings (B, pooled_dim) and the position ids.

    Args:
        config: the model's size.
        batch: B.
        generator: source of every value; must live on ``device``.
        device: where the tensors go.

    Returns:
        ``(inputs, target)``: keyword arguments of the model's forward, and a target shaped
        like its output sample (the input latents' shape: ``out_channels == in_channels``).
    """
    kw: dict[str, Any] = {"generator": generator, "device": device}
    if config.family == "dit":
        shape: tuple[int, ...] = (batch, config.in_channels, config.latent_size, config.latent_size)
        inputs = {
            "hidden_states": torch.randn(shape, **kw),
            "timestep": torch.randint(0, 1000, (batch,), **kw),
            "class_labels": torch.randint(0, config.num_classes, (batch,), **kw),
        }
    else:
        shape = (batch, config.image_tokens, config.in_channels)
        inputs = {
            "hidden_states": torch.randn(shape, **kw),
            "encoder_hidden_states": torch.randn(batch, config.text_tokens, config.text_dim, **kw),
            "pooled_projections": torch.randn(batch, config.pooled_dim, **kw),
            "timestep": torch.rand(batch, **kw),
            "img_ids": flux_image_ids(config.latent_size, device=device),
            "txt_ids": torch.zeros(config.text_tokens, 3, device=device),
        }
    return inputs, torch.randn(shape, **kw)


__all__ = [
    "DIFFUSERS_CONFIGS",
    "FAMILY_CLASSES",
    "DiffusersConfig",
    "Family",
    "build_diffusers_model",
    "diffusers_config",
    "flux_image_ids",
    "training_inputs",
]
