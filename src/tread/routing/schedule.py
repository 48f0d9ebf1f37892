"""Skip-ratio schedules over training steps: one ratio per step, so shapes are static per step."""

from __future__ import annotations

import math
from typing import Literal, get_args

RatioSchedule = Literal["constant", "linear", "cosine"]
RATIO_SCHEDULES: tuple[str, ...] = get_args(RatioSchedule)


def scheduled_ratio(
    schedule: str,
    ratio: float,
    ratio_final: float | None,
    step: int,
    steps: int,
) -> float:
    """The skip ratio of training step ``step`` (0-based) under a schedule.

    "constant" is ``ratio`` at every step. "linear" and "cosine" go from ``ratio`` at step 0 to
    ``ratio_final`` at step ``steps`` and stay there; cosine moves slowly at both ends
    (progress ``(1 - cos(pi s / S)) / 2``). The value at step 0 is exactly ``ratio`` and from
    step ``steps`` on exactly ``ratio_final``, so the kept count there is the one a constant
    route of that ratio would use (the draws of step 0 do not depend on the schedule).

    Args:
        schedule: one of :data:`RATIO_SCHEDULES`.
        ratio: skip ratio at step 0, in [0, 1).
        ratio_final: skip ratio from step ``steps`` on (ignored by "constant").
        step: the training step (the number of updates done before it).
        steps: S, the length of the schedule, >= 1.

    Returns:
        The skip ratio, between ``ratio`` and ``ratio_final`` (both included).

    Raises:
        ValueError: an unknown schedule, or a missing ``ratio_final`` / ``steps`` < 1.
    """
    if schedule not in RATIO_SCHEDULES:
        raise ValueError(f"unknown ratio schedule {schedule!r} (one of {RATIO_SCHEDULES})")
    if schedule == "constant":
        return ratio
    if ratio_final is None or steps < 1:
        raise ValueError(f"a {schedule} schedule needs ratio_final and steps >= 1")
    if step >= steps:
        return ratio_final
    fraction = max(step, 0) / steps
    progress = fraction if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * fraction))
    value = ratio + (ratio_final - ratio) * progress  # progress 0 -> exactly ``ratio``
    # Rounding must not step outside [ratio, ratio_final] (and so never reach 1).
    return min(max(value, min(ratio, ratio_final)), max(ratio, ratio_final))
