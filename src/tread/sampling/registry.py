"""Sampler registry and the ``sample`` entry point that ties objective, guidance and solver."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.transport import Objective
from tread.transport.types import Net, ObjectiveName

from .guidance import cfg
from .rng import NoiseSource
from .solvers import Solver, edm_heun, flow_euler, flow_euler_maruyama, flow_heun


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler and the objective whose prediction callable it integrates."""

    solver: Solver
    objective: ObjectiveName


SAMPLERS: dict[str, SamplerSpec] = {
    "edm_heun": SamplerSpec(edm_heun, "edm"),
    "flow_euler": SamplerSpec(flow_euler, "flow"),
    "flow_heun": SamplerSpec(flow_heun, "flow"),
    "flow_euler_maruyama": SamplerSpec(flow_euler_maruyama, "flow"),
}

# Arguments every solver takes positionally or by the shared signature, not as **options.
_SHARED_ARGS = frozenset({"fn", "noise", "y", "steps", "rng"})


def solver_options(sampler: str) -> tuple[str, ...]:
    """Names of the extra keyword options a registered sampler accepts.

    Args:
        sampler: key of ``SAMPLERS``.

    Returns:
        Option names, in signature order.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    params = inspect.signature(SAMPLERS[sampler].solver).parameters
    return tuple(name for name in params if name not in _SHARED_ARGS)


def sample(
    objective: Objective,
    net: Net,
    noise: Tensor,
    y: Tensor,
    *,
    sampler: str,
    steps: int,
    rng: NoiseSource | None = None,
    guidance: float = 1.0,  # classifier-free guidance scale; 1 is off
    null_label: int | None = None,  # the network's null class; required when guidance != 1
    guidance_interval: tuple[float, float] | None = None,  # in sigma (EDM) or t (flow)
    **options: Any,
) -> Tensor:
    """Draw samples from ``net`` trained with ``objective``, without gradients.

    Leaves ``net``'s train/eval mode alone: put it in eval mode first if it has dropout etc.

    Args:
        objective: the training objective (decides the prediction callable).
        net: raw network ``net(x, t, y)``.
        noise: (B, ...) unit Gaussian noise, e.g. ``PerSampleRNG(seeds).randn((C, H, W))``.
        y: (B,) labels.
        sampler: key of ``SAMPLERS``; must match the objective.
        steps: solver steps (see each solver).
        rng: noise source for stochastic solvers.
        guidance: CFG scale (see ``tread.sampling.guidance.cfg``).
        null_label: label meaning "no class".
        guidance_interval: optional (lo, hi) interval where guidance applies.
        **options: solver-specific options, e.g. ``s_churn`` for ``edm_heun``.

    Returns:
        (B, ...) samples.
    """
    allowed = solver_options(sampler)  # also rejects unknown samplers
    spec = SAMPLERS[sampler]
    if spec.objective != objective.name:
        raise ConfigError(
            f"sampler {sampler!r} needs a {spec.objective!r} objective, got {objective.name!r}"
        )
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} for sampler {sampler!r} (known: {', '.join(allowed)})"
            )
    fn = objective.prediction(net)
    if guidance != 1:
        if null_label is None:
            raise ConfigError(f"guidance={guidance!r} needs null_label (the network's num_classes)")
        fn = cfg(fn, guidance, null_label, guidance_interval)
    with torch.no_grad():
        return spec.solver(fn, noise, y, steps=steps, rng=rng, **options)
