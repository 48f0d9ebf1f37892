"""tread: train diffusion transformers faster with TREAD token routing.

Public API (stable): :class:`Route`, :func:`build_model`, :func:`route_blocks`,
:func:`forward_flops`, :func:`ideal_speedup`, :func:`load_pretrained` (published DiT/SiT
weights).
"""

from .cost import forward_flops, ideal_speedup
from .models import MODEL_CONFIGS, build_model
from .pretrained import load_pretrained
from .routing import Route, route_blocks

__all__ = [
    "MODEL_CONFIGS",
    "Route",
    "build_model",
    "forward_flops",
    "ideal_speedup",
    "load_pretrained",
    "route_blocks",
]
__version__ = "0.1.0"
