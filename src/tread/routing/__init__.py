"""Token routing (knows nothing of diffusion): route specs, plans and the one block loop."""

from .apply import route_blocks
from .plan import RoutePlan, sample_plan
from .spec import Route, describe_routes, resolve_routes

__all__ = ["Route", "RoutePlan", "describe_routes", "resolve_routes", "route_blocks", "sample_plan"]
