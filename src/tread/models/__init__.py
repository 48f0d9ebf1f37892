"""Backbones (DiT/SiT, and every other registered family) routed through one shared block loop."""

from .backbone import ArchConfig, RoutableBackbone
from .dit import DiT, DiTBlock, DiTConfig
from .lightning import LightningDiT, LightningDiTConfig
from .registry import MODEL_CONFIGS, build_model

__all__ = [
    "ArchConfig",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "LightningDiT",
    "LightningDiTConfig",
    "MODEL_CONFIGS",
    "RoutableBackbone",
    "build_model",
]
