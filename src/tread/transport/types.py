"""Type aliases shared by the objectives and the samplers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

# The network contract: ``net(x, t, y) -> out`` with x (B, C, H, W), t (B,) float, y (B,) long.
# ``y == num_classes`` is the null label used by classifier-free guidance.
Net = Callable[[Tensor, Tensor, Tensor], Tensor]

# What an objective hands to a sampler: ``fn(x, time, y) -> prediction``, same shape as x. For
# EDM ``time`` is sigma and the prediction is the denoised x0; for flow matching ``time`` is t in
# [0, 1] and the prediction is the velocity.
Prediction = Callable[[Tensor, Tensor, Tensor], Tensor]

ObjectiveName = Literal["edm", "flow"]


def expand_to(per_sample: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tensor so it broadcasts against ``like``.

    Args:
        per_sample: (B,) values, one per sample.
        like: (B, ...) tensor to broadcast against.

    Returns:
        (B, 1, ..., 1) view with ``like.ndim`` dimensions.
    """
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
