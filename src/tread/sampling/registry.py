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

from .guidance import GUIDANCE_MODES, GuidanceMode, cfg, sparse_guidance
from .meter import CostMeter
from .rng import NoiseSource
from .solvers import Solver, edm_heun, flow_euler, flow_euler_maruyama, flow_heun
from .sparse import SparseGuidance, routed_branch


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
    guidance: float = 1.0,  # the guidance weight: CFG scale, or SG's omega; 1 is off
    null_label: int | None = None,  # the network's null class; needed by cfg and cfg+sg
    guidance_interval: tuple[float, float] | None = None,  # in sigma (EDM) or t (flow)
    guidance_mode: GuidanceMode = "cfg",
    sparse: SparseGuidance | None = None,  # ratios and spans of the SG branches
    route_rng: NoiseSource | None = None,  # routing draws of routed SG branches
    meter: CostMeter | None = None,  # counts evaluations and FLOPs of this call
    **options: Any,
) -> Tensor:
    """Draw samples from ``net`` trained with ``objective``, without gradients.

    Leaves ``net``'s train/eval mode alone: put it in eval mode first if it has dropout etc.
    Guidance wraps the prediction callable the solver integrates; the solver never sees it.

    Args:
        objective: the training objective (decides the prediction callable).
        net: raw network ``net(x, t, y)``; for "sg" / "cfg+sg" a routable one that also takes
            ``routes=`` and ``plans=`` (a tread backbone).
        noise: (B, ...) unit Gaussian noise, e.g. ``PerSampleRNG(seeds).randn((C, H, W))``.
        y: (B,) labels.
        sampler: key of ``SAMPLERS``; must match the objective.
        steps: solver steps (see each solver).
        rng: noise source for stochastic solvers.
        guidance: guidance weight (see ``cfg`` and ``sparse_guidance``).
        null_label: label meaning "no class".
        guidance_interval: optional (lo, hi) interval where guidance applies (any mode).
        guidance_mode: "cfg", "sg" or "cfg+sg".
        sparse: the SG branches' ratios and spans; required for "sg" and "cfg+sg".
        route_rng: where routed branches draw their kept tokens; a ``PerSampleRNG`` keeps
            sample i independent of the batch; required when a branch is routed.
        meter: cost meter; its counts grow by this call's evaluations, FLOPs and images.
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
    if guidance_mode not in GUIDANCE_MODES:
        raise ConfigError(
            f"guidance_mode must be one of {', '.join(GUIDANCE_MODES)}, got {guidance_mode!r}"
        )
    call = net if meter is None else meter.wrap(net)
    interval = tuple(guidance_interval) if guidance_interval is not None else None
    if guidance_mode == "cfg":
        fn = objective.prediction(call)
        if guidance != 1:
            if null_label is None:
                raise ConfigError(
                    f"guidance={guidance!r} needs null_label (the network's num_classes)"
                )
            fn = cfg(fn, guidance, null_label, interval)
    else:
        fn = _sparse_prediction(
            objective, net, call, guidance, guidance_mode, sparse, route_rng, null_label, interval
        )
    with torch.no_grad():
        out = spec.solver(fn, noise, y, steps=steps, rng=rng, **options)
    if meter is not None:
        meter.images += noise.shape[0]
    return out


def _sparse_prediction(
    objective: Objective,
    model: Any,
    call: Any,
    omega: float,
    mode: GuidanceMode,
    sparse: SparseGuidance | None,
    route_rng: NoiseSource | None,
    null_label: int | None,
    interval: tuple[float, float] | None,
) -> Any:
    """The SG / CFG+SG prediction: two routed branches of ``call`` combined by omega."""
    if sparse is None:
        raise ConfigError(f"guidance_mode={mode!r} needs sparse= (the branches' ratios and spans)")
    if mode == "cfg+sg" and null_label is None:
        raise ConfigError("guidance_mode='cfg+sg' needs null_label (the network's num_classes)")
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        sparse.check_depth(len(blocks))  # a clear error before the first step
    if route_rng is None:
        raise ConfigError(
            f"guidance_mode={mode!r} routes a branch and needs route_rng (e.g. a PerSampleRNG)"
        )
    strong = routed_branch(
        objective, call, sparse.routes(sparse.strong_ratio), route_rng, model=model
    )
    weak = routed_branch(objective, call, sparse.routes(sparse.weak_ratio), route_rng, model=model)
    return sparse_guidance(
        strong,
        weak,
        omega,
        null_label=null_label if mode == "cfg+sg" else None,
        interval=interval,
    )
