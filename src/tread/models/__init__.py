"""Backbones (DiT/SiT, and every other registered family) routed through one shared block loop."""

from .backbone import ArchConfig, RoutableBackbone
from .dit import DiT, DiTBlock, DiTConfig
from .lightning import LightningDiT, LightningDiTConfig
from .mamba import Mamba, MambaConfig
from .registry import MODEL_CONFIGS, build_model
from .rwkv import RWKV, RWKVConfig

__all__ = [
    "ArchConfig",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "LightningDiT",
    "LightningDiTConfig",
    "Mamba",
    "MambaConfig",
    "MODEL_CONFIGS",
    "RoutableBackbone",
    "RWKV",
    "RWKVConfig",
    "build_model",
]
