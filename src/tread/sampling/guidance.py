"""Guidance as wrappers around prediction callables: classifier-free guidance (Ho & Salimans
2022) and sparse guidance (SG, arXiv 2601.01608; paper-notes §12).

Every mode may be limited to an interval of the callable's own time variable (Kynkaanniemi et al.
2024, "Applying guidance in a limited interval"; the TREAD paper's double-dagger rows).
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.transport.types import Prediction

# "cfg": uncond + w (cond - uncond). "sg": w D(c; strong) + (1 - w) D(c; weak), both branches
# conditional, the weak one routed at a higher skip ratio. "cfg+sg": the weak branch is also
# unconditional (SG Eq. 8).
GuidanceMode = Literal["cfg", "sg", "cfg+sg"]
GUIDANCE_MODES: tuple[str, ...] = get_args(GuidanceMode)


class Branch(Protocol):
    """One branch of sparse guidance: a prediction callable that is told which samples it sees.

    ``rows`` (B_in,) are the positions of its inputs in the sampler's batch, so a routed branch
    can draw each sample's kept tokens from that sample's own random stream (per-sample seeding
    of the routing draw; see :func:`tread.sampling.sparse.routed_branch`).
    """

    def __call__(self, x: Tensor, time: Tensor, y: Tensor, rows: Tensor) -> Tensor: ...


def _check_weight(weight: float, interval: tuple[float, float] | None) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"guidance scale must be a finite number >= 0, got {weight!r}")
    if interval is not None:
        lo, hi = interval
        if not lo <= hi:
            raise ConfigError(f"guidance interval must satisfy lo <= hi, got {interval!r}")


def _inside(time: Tensor, interval: tuple[float, float] | None) -> Tensor:
    """(B,) bool: the samples whose time lies in the (inclusive) interval; all without one."""
    if interval is None:
        return torch.ones_like(time, dtype=torch.bool)
    return (time >= interval[0]) & (time <= interval[1])


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
    _check_weight(scale, interval)
    if scale == 1:
        return fn

    def guided(x: Tensor, time: Tensor, y: Tensor) -> Tensor:
        inside = _inside(time, interval)  # (B,)
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


def sparse_guidance(
    strong: Branch,
    weak: Branch,
    omega: float,
    *,
    null_label: int | None = None,  # set: CFG+SG, the weak branch gets the null label
    interval: tuple[float, float] | None = None,
) -> Prediction:
    """Wrap two branches so they return weak + omega * (strong - weak) (SG Eq. 6-8).

    That is omega * D(c; strong) + (1 - omega) * D(c; weak): both branches conditional (SG), or
    the weak one unconditional when ``null_label`` is given (CFG+SG). The branches are separate
    calls (their token counts differ, so they cannot share a batch). Outside the interval a
    sample gets the strong, conditional branch alone, and a step where no sample is inside costs
    one strong call. ``omega == 1`` calls only the strong branch.

    Args:
        strong: the strong (denser) branch, e.g. the dense network.
        weak: the weak (sparser) branch, e.g. the network with a route at a high skip ratio.
        omega: guidance weight >= 0; 1 is the strong branch alone.
        null_label: the network's null class for CFG+SG; None for SG.
        interval: optional ``(lo, hi)`` in the prediction's time variable where guidance applies.

    Returns:
        Prediction callable: x (B, ...), time (B,), y (B,) -> (B, ...).
    """
    _check_weight(omega, interval)

    def guided(x: Tensor, time: Tensor, y: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0], device=y.device)  # (B,) the whole sampler batch
        cond = strong(x, time, y, rows)
        if omega == 1:
            return cond
        inside = _inside(time, interval)  # (B,)
        # One host sync per call, as in cfg: outside the interval the weak call is skipped.
        if not bool(inside.any()):
            return cond
        idx = inside.nonzero().squeeze(1)  # (B_in,)
        labels = y[idx] if null_label is None else torch.full_like(y[idx], null_label)
        weak_out = weak(x[idx], time[idx], labels, idx)  # (B_in, ...)
        mixed = weak_out + omega * (cond[idx] - weak_out)  # (B_in, ...)
        return cond.index_copy(0, idx, mixed)

    return guided
