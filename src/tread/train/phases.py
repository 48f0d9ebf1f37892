"""What one training step uses as a function of its index: routes, skip ratios, learning rate.

Nothing here holds state: a step's routes and rate follow from the config and the step alone,
so a resumed run (before, at or after the dense fine-tune switch, anywhere on a ratio schedule)
uses exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..routing import Route
from ..visual import FINETUNE_EVENT  # the plot draws the switch from the row that carries it

__all__ = [
    "FINETUNE_EVENT",
    "fix_schedule_horizons",
    "learning_rate",
    "scheduled",
    "step_fields",
    "step_routes",
]


def scheduled(config: Config) -> bool:
    """Whether some route's skip ratio changes over training (a non-constant schedule)."""
    return any(r.schedule != "constant" for r in config.model.routes)


def learning_rate(config: Config, step: int) -> float:
    """The rate of step ``step``: ``optim.lr`` after a linear warm-up over ``optim.warmup_steps``;
    ``train.finetune_lr`` in the dense fine-tune phase when set (the paper's "(F)": 1e-5)."""
    optim, tc = config.optim, config.train
    if tc.in_finetune(step) and tc.finetune_lr is not None:
        return tc.finetune_lr
    if not optim.warmup_steps:
        return optim.lr
    return optim.lr * min(1.0, (step + 1) / optim.warmup_steps)


def step_routes(config: Config, routes: Sequence[Route], step: int) -> tuple[Route, ...]:
    """The routes step ``step`` runs: none in the dense fine-tune phase, else ``routes`` (the
    model's, resolved) at the step's scheduled ratios.

    With constant schedules this is ``routes`` itself, so the kept counts and therefore the
    step's random draws are exactly those of a run without schedules.

    Args:
        config: the run's config (``model.routes`` in the same order as ``routes``).
        routes: the model's resolved routes (``model.routes`` of the built backbone).
        step: the training step (0-based).
    """
    if config.train.in_finetune(step):
        return ()
    if not scheduled(config):
        return tuple(routes)
    total = config.train.steps
    return tuple(
        Route(route.start, route.end, spec.ratio_at(step, total))
        for route, spec in zip(routes, config.model.routes, strict=True)
    )


def step_fields(
    config: Config, routes: Sequence[Route], num_tokens: int, step: int
) -> dict[str, Any]:
    """Metrics-row fields that say how step ``step`` was routed (empty for a plain run).

    ``phase`` ("routed" | "finetune") when the run has a fine-tune phase; ``ratio/<i>`` (skip
    ratio, 0 when routing is off) and ``kept/<i>`` (K of N tokens) per route when a schedule
    is not constant.
    """
    fields: dict[str, Any] = {}
    tc = config.train
    if tc.finetune_from is not None:
        fields["phase"] = "finetune" if tc.in_finetune(step) else "routed"
    if scheduled(config):
        used = step_routes(config, routes, step)
        for index in range(len(config.model.routes)):
            ratio = used[index].ratio if used else 0.0
            fields[f"ratio/{index}"] = ratio
            fields[f"kept/{index}"] = used[index].num_kept(num_tokens) if used else num_tokens
    return fields


def fix_schedule_horizons(config: Config, saved: Config | None = None) -> Config:
    """Fill ``schedule_steps`` where None, once, when a run starts.

    None means "the run's train.steps" when the run starts (``saved`` None), and the
    checkpoint's horizon when it resumes: a resume with more ``train.steps`` (e.g. to fine-tune)
    must not stretch a schedule that has already run. The filled value is what the run's
    config.yaml and its checkpoints hold.

    Args:
        config: the resolved config of this run.
        saved: the checkpoint's config when resuming (its routes in the same order).
    """
    old = saved.model.routes if saved is not None else [None] * len(config.model.routes)
    if len(old) != len(config.model.routes):
        return config  # a different model: the resume's compatibility check refuses it
    routes = []
    for spec, before in zip(config.model.routes, old, strict=True):
        if spec.schedule != "constant" and spec.schedule_steps is None:
            keep = before is not None and before.schedule_steps is not None
            horizon = before.schedule_steps if keep else config.train.steps
            spec = dataclasses.replace(spec, schedule_steps=horizon)
        routes.append(spec)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, routes=routes))
