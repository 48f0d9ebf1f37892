"""Classifier-free guidance as a wrapper around a prediction callable (Ho & Salimans 2022).

Optionally limited to an interval of the callable's own time variable (Kynkaanniemi et al. 2024,
"Applying guidance in a limited interval"; the TREAD paper's double-dagger rows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.transport.types import Prediction


def cfg(
    fn: Prediction,
    scale: float,
    null_label: int,
    interval: tuple[float, float] | None = None,
    *,
    uncond_fn: Prediction | None = None,
) -> Prediction:
    """Wrap ``fn`` so it returns uncond + scale * (cond - uncond).

    The conditional and null-label batches go through ``fn`` in one concatenated call. With an
    interval, only samples whose time lies in [lo, hi] (inclusive) get the unconditional pass;
    the rest return the conditional prediction alone, and a step where no sample is inside costs
    a single conditional call. ``scale == 1`` returns ``fn`` itself.

    Args:
        fn: prediction callable ``fn(x, time, y)``; time is sigma for EDM, t for flow.
        scale: guidance scale s >= 0; 1 means no guidance, 0 means unconditional.
        null_label: label value meaning "no class" (the network's ``num_classes``).
        interval: optional ``(lo, hi)`` in fn's time variable where guidance applies.
        uncond_fn: optional separate callable for the unconditional branch, e.g. a routed
            ("sparse") network as in sparse guidance; it is then called on its own, not batched.

    Returns:
        Callable with the same signature as ``fn``: x (B, ...), time (B,), y (B,) -> (B, ...).
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"guidance scale must be a finite number >= 0, got {scale!r}")
    if interval is not None:
        lo, hi = interval
        if not lo <= hi:
            raise ConfigError(f"guidance interval must satisfy lo <= hi, got {interval!r}")
    if scale == 1:
        return fn

    def guided(x: Tensor, time: Tensor, y: Tensor) -> Tensor:
        if interval is None:
            inside = torch.ones_like(time, dtype=torch.bool)
        else:
            inside = (time >= interval[0]) & (time <= interval[1])  # (B,)
        # One host sync per call; sampling is not graph-captured, and skipping the
        # unconditional pass outside the interval is the point of interval guidance.
        if not bool(inside.any()):
            return fn(x, time, y)
        idx = inside.nonzero().squeeze(1)  # (B_in,)
        null = torch.full_like(y[idx], null_label)
        if uncond_fn is None:
            batch = x.shape[0]
            out = fn(
                torch.cat([x, x[idx]]),  # (B + B_in, ...)
                torch.cat([time, time[idx]]),
                torch.cat([y, null]),
            )
            cond, uncond = out[:batch], out[batch:]
        else:
            cond = fn(x, time, y)
            uncond = uncond_fn(x[idx], time[idx], null)
        mixed = uncond + scale * (cond[idx] - uncond)  # (B_in, ...)
        return cond.index_copy(0, idx, mixed)

    return guided
