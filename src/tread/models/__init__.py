"""Backbones: DiT/SiT with TREAD routing through one shared block loop."""

from .backbone import RoutableBackbone
from .dit import DiT, DiTBlock, DiTConfig
from .registry import MODEL_CONFIGS, build_model

__all__ = ["DiT", "DiTBlock", "DiTConfig", "MODEL_CONFIGS", "RoutableBackbone", "build_model"]
