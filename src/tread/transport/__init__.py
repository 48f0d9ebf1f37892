"""Training objectives: each takes the network as a plain callable and returns per-sample losses."""

from __future__ import annotations

import dataclasses
from typing import Any

from tread.errors import ConfigError

from .edm import EDM
from .flow import FlowMatching, TimeSampling
from .types import Net, ObjectiveName, Prediction

Objective = EDM | FlowMatching

OBJECTIVES: dict[str, type[EDM] | type[FlowMatching]] = {"edm": EDM, "flow": FlowMatching}


def build_objective(name: ObjectiveName, **kwargs: Any) -> Objective:
    """Build an objective by name, rejecting unknown names and options.

    Args:
        name: "edm" or "flow".
        **kwargs: fields of the objective's dataclass (e.g. ``p_mean`` or ``time_sampling``).

    Returns:
        The configured objective.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in kwargs:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown option {key!r} for objective {name!r} (known: {known})")
    return cls(**kwargs)


__all__ = [
    "EDM",
    "OBJECTIVES",
    "FlowMatching",
    "Net",
    "Objective",
    "ObjectiveName",
    "Prediction",
    "TimeSampling",
    "build_objective",
]
