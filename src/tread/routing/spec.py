"""Route specification: which blocks a random share of the tokens skips (TREAD, method section)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """A route r(start -> end): a random share ``ratio`` of the tokens skips blocks start..end.

    Both ``start`` and ``end`` are **inclusive** block indices, as in the paper and the official
    code: routed tokens skip block ``start`` and block ``end``. Negative indices count from the
    end (``-1`` is the last block) and are resolved against the model depth by
    :func:`resolve_routes`. ``ratio`` is the fraction of tokens that SKIP the span; the kept count
    per sample is ``N - floor(N * ratio)``, at least 1.

    Args:
        start: first skipped block (inclusive).
        end: last skipped block (inclusive).
        ratio: fraction of tokens that skip the span, 0 <= ratio < 1.
    """

    start: int
    end: int
    ratio: float = 0.5

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Route.{name} must be an int block index, got {value!r}")
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"Route.ratio must be a number in [0, 1), got {ratio!r}")
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"Route.ratio must be in [0, 1) (fraction that skips), got {ratio!r}")
        object.__setattr__(self, "ratio", float(ratio))
        # With both indices of the same sign the order is known before the depth is.
        if (self.start >= 0) == (self.end >= 0) and self.start > self.end:
            raise ValueError(f"Route start {self.start} > end {self.end}")

    def resolve(self, depth: int) -> Route:
        """Return this route with non-negative indices for a model of ``depth`` blocks.

        Raises:
            ValueError: an index is out of range for ``depth`` or start > end after resolving.
        """
        start = self.start + depth if self.start < 0 else self.start
        end = self.end + depth if self.end < 0 else self.end
        for name, raw, value in (("start", self.start, start), ("end", self.end, end)):
            if not 0 <= value < depth:
                raise ValueError(
                    f"Route {name}={raw} is out of range for a model with {depth} blocks"
                )
        if start > end:
            raise ValueError(f"Route {self} resolves to start {start} > end {end} (depth {depth})")
        return Route(start, end, self.ratio)

    def num_kept(self, num_tokens: int) -> int:
        """Tokens per sample that run through the span: N - floor(N * ratio), at least 1."""
        return max(1, num_tokens - math.floor(num_tokens * self.ratio))

    @property
    def length(self) -> int:
        """Number of skipped blocks (valid only after :meth:`resolve`)."""
        return self.end - self.start + 1


def resolve_routes(routes: Sequence[Route], depth: int) -> tuple[Route, ...]:
    """Resolve negative indices and check that the routes are sorted and do not overlap.

    Args:
        routes: route list in application order.
        depth: number of blocks of the model.

    Returns:
        The routes with non-negative indices.

    Raises:
        ValueError: naming the offending route.
    """
    if isinstance(routes, Route):
        raise ValueError("routes must be a list of Route, got a single Route (wrap it in [...])")
    resolved: list[Route] = []
    for route in routes:
        if not isinstance(route, Route):
            raise ValueError(f"routes must contain tread.Route objects, got {route!r}")
        current = route.resolve(depth)
        if resolved and current.start <= resolved[-1].end:
            raise ValueError(
                f"routes must be sorted and non-overlapping: {route} starts at or before the end "
                f"of {resolved[-1]} (depth {depth})"
            )
        resolved.append(current)
    return tuple(resolved)


def describe_routes(routes: Sequence[Route], depth: int) -> str:
    """Routes in the paper's notation with resolved indices, e.g. ``r(2→4, 0.5)``; or "dense"."""
    resolved = resolve_routes(routes, depth)
    return ", ".join(f"r({r.start}→{r.end}, {r.ratio:g})" for r in resolved) or "dense"
