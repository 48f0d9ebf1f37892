"""Cost of sampling as it happens: network evaluations (NFE) and forward FLOPs per image.

The meter wraps the raw network and counts every call it really makes: each guidance branch, the
batched CFG halves, and only the steps inside a guidance interval. FLOPs come from an analytic
per-sample price of a forward pass under the call's routes (``tread.cost.forward_flops``), so a
sparse branch counts at its kept fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from tread.routing import Route

# Forward FLOPs of one sample under a route list, e.g. ``lambda r: forward_flops(model, r)``.
FlopsOf = Callable[[Sequence[Route]], int]


class CostMeter:
    """Counts network evaluations and FLOPs over one or more ``sample`` calls.

    Args:
        flops_of: per-sample forward FLOPs for a route list; None when the network has no
            analytic price (then only NFE is counted).

    Attributes:
        evaluations: network evaluations summed over samples (a call on b samples adds b).
        flops: FLOPs summed over samples, or None without ``flops_of``.
        images: samples drawn (added by :func:`tread.sampling.sample`).
    """

    def __init__(self, flops_of: FlopsOf | None = None) -> None:
        self.flops_of = flops_of
        self._prices: dict[tuple[Route, ...], int] = {}
        self.evaluations = 0
        self.flops: int | None = 0 if flops_of is not None else None
        self.images = 0

    def price(self, routes: Sequence[Route]) -> int | None:
        """Per-sample forward FLOPs of a call with ``routes`` (cached), or None."""
        if self.flops_of is None:
            return None
        key = tuple(routes)
        if key not in self._prices:
            self._prices[key] = int(self.flops_of(key))
        return self._prices[key]

    def wrap(self, net: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``net`` with every call counted; keyword arguments (routes, plans) pass through.

        A call without ``routes`` is priced at the network's default for its mode (the
        backbone's ``active_routes(None)``: dense in eval mode), which is what it computes.

        Args:
            net: raw network ``net(x, t, y, **kwargs)``.

        Returns:
            Callable with the same signature.
        """
        active = getattr(net, "active_routes", None)

        def counted(x: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
            routes = kwargs.get("routes")
            if routes is None:
                routes = active(None) if callable(active) else ()
            batch = x.shape[0]
            self.evaluations += batch
            price = self.price(routes)
            if price is not None and self.flops is not None:
                self.flops += batch * price
            return net(x, t, y, **kwargs)

        return counted

    def per_image(self) -> dict[str, float | None]:
        """NFE and forward FLOPs per image so far.

        Returns:
            ``{"nfe_per_image": ..., "flops_per_image": ...}`` (FLOPs None when unpriced; both
            None before any image).
        """
        if self.images == 0:
            return {"nfe_per_image": None, "flops_per_image": None}
        flops = None if self.flops is None else self.flops / self.images
        return {"nfe_per_image": self.evaluations / self.images, "flops_per_image": flops}
