"""Training: the loop, EMA, checkpoints, distributed helpers."""

from .builders import prepare_run, resolve_run
from .checkpoint import load_for_inference, resolve_checkpoint
from .dist import DistInfo
from .loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "DistInfo",
    "NonFiniteLossError",
    "TrainResult",
    "load_for_inference",
    "prepare_run",
    "resolve_checkpoint",
    "resolve_run",
    "train",
]
