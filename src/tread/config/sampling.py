"""The ``sample:`` section: sampler, guidance (CFG, sparse guidance, CFG+SG) and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..routing import Route
from .checks import check_choice, check_positive

if TYPE_CHECKING:
    from ..sampling import SparseGuidance


@dataclass
class SampleConfig:
    """Sampling settings for periodic grids, evaluation and ``tread sample`` defaults."""

    sampler: str = "edm_heun"
    steps: int = 18
    guidance: float = 1.0  # the guidance weight: CFG scale s, or SG's omega; 1 = off
    guidance_interval: list[float] | None = None  # [lo, hi] in the sampler's time variable
    # "cfg": uncond + s (cond - uncond). "sg" (sparse guidance): omega D(c; strong) +
    # (1 - omega) D(c; weak), the weak branch routed at a higher skip ratio. "cfg+sg": the weak
    # branch is also unconditional.
    guidance_mode: str = "cfg"
    sg_strong_ratio: float = 0.0  # skip ratio of the strong branch (0 = dense)
    sg_weak_ratio: float | None = None  # skip ratio of the weak branch; None = training ratio
    sg_route: list[int] | None = None  # [start, end] of the sparse branches; None = training's
    seed: int = 0
    grid_size: int = 100  # images in each periodic grid (labels cycle through the classes)

    def __post_init__(self) -> None:
        from ..sampling import SAMPLERS

        check_choice("sample", "sampler", self.sampler, list(SAMPLERS))
        check_positive("sample", "steps", self.steps)
        check_positive("sample", "guidance", self.guidance, allow_zero=True)
        check_positive("sample", "grid_size", self.grid_size)
        interval = self.guidance_interval
        if interval is not None and (
            len(interval) != 2
            or not all(math.isfinite(v) and v >= 0 for v in interval)
            or interval[0] > interval[1]
        ):
            raise ConfigError(
                f"sample.guidance_interval={list(interval)!r} (--guidance-interval) needs "
                "[lo, hi] with 0 <= lo <= hi"
            )
        self._check_sparse_guidance()

    def _check_sparse_guidance(self) -> None:
        """The SG fields on their own (the route and the training ratio: ``sparse_guidance``)."""
        from ..sampling import GUIDANCE_MODES

        check_choice("sample", "guidance_mode", self.guidance_mode, GUIDANCE_MODES)
        for key, flag in (("sg_strong_ratio", "--sg-strong"), ("sg_weak_ratio", "--sg-weak")):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"sample.{key}={value!r} ({flag}) must be in [0, 1)")
        weak = self.sg_weak_ratio
        if weak is not None and not self.sg_strong_ratio < weak:
            raise ConfigError(
                f"sample.sg_strong_ratio={self.sg_strong_ratio!r} (--sg-strong) must be below "
                f"sample.sg_weak_ratio={weak!r} (--sg-weak): the weak branch skips more tokens"
            )
        route = self.sg_route
        if route is not None:
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in route)
            if len(route) != 2 or not ints:
                raise ConfigError(
                    f"sample.sg_route={list(route)!r} (--sg-route) needs [start, end] block indices"
                )
            start, end = route
            if (start >= 0) == (end >= 0) and start > end:
                raise ConfigError(
                    f"sample.sg_route={list(route)!r} (--sg-route): start {start} comes after "
                    f"end {end}"
                )

    def sparse_guidance(self, training: Sequence[Route], depth: int) -> SparseGuidance | None:
        """The sparse-guidance branches this config asks for, with defaults from training.

        Args:
            training: the run's training routes (the default spans; their common ratio is the
                default weak ratio).
            depth: the model's number of blocks (``sg_route`` is checked against it).

        Returns:
            The branches' ratios and spans (block indices resolved), or None in mode "cfg".

        Raises:
            ConfigError: one line naming the key (and its CLI flag) and value.
        """
        from ..sampling import SparseGuidance

        if self.guidance_mode == "cfg":
            return None
        mode = f"sample.guidance_mode={self.guidance_mode!r}"
        if self.sg_route is not None:
            start, end = self.sg_route
            try:
                Route(start, end).resolve(depth)
            except ValueError:
                raise ConfigError(
                    f"sample.sg_route={list(self.sg_route)!r} (--sg-route) is outside the "
                    f"model's {depth} blocks (valid: {-depth}..{depth - 1}, start before end)"
                ) from None
            spans = ((start, end),)
        elif training:
            spans = tuple((r.start, r.end) for r in training)
        else:
            raise ConfigError(
                f"{mode} needs a route for its sparse branch, and this model was trained "
                "without one: set sample.sg_route=[start, end] (--sg-route START,END)"
            )
        weak = self.sg_weak_ratio
        if weak is None:
            ratios = sorted({r.ratio for r in training})
            if len(ratios) != 1:
                what = "without routes" if not ratios else f"with ratios {ratios}"
                raise ConfigError(
                    f"{mode} takes its weak ratio from the training route, but the model was "
                    f"trained {what}: set sample.sg_weak_ratio (--sg-weak)"
                )
            weak = ratios[0]
        if not self.sg_strong_ratio < weak:
            raise ConfigError(
                f"sample.sg_strong_ratio={self.sg_strong_ratio!r} (--sg-strong) must be below "
                f"the weak ratio {weak!r} (sample.sg_weak_ratio / --sg-weak, default: the "
                "training ratio)"
            )
        # Spans with non-negative block indices, so records and printouts name real blocks.
        resolved = tuple((start % depth, end % depth) for start, end in spans)
        return SparseGuidance(self.sg_strong_ratio, float(weak), resolved)
