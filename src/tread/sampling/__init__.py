"""Samplers (one signature), guidance wrappers (CFG, sparse guidance), per-sample randomness
and the cost meter."""

from __future__ import annotations

from .guidance import GUIDANCE_MODES, Branch, GuidanceMode, cfg, sparse_guidance
from .meter import CostMeter
from .registry import SAMPLERS, SamplerSpec, sample, solver_options
from .rng import NoiseSource, PerSampleRNG, randn_like
from .solvers import (
    DiffusionForm,
    Solver,
    edm_heun,
    edm_sigmas,
    flow_euler,
    flow_euler_maruyama,
    flow_heun,
    flow_times,
)
from .sparse import SparseGuidance, draw_plans, routed_branch

__all__ = [
    "GUIDANCE_MODES",
    "SAMPLERS",
    "Branch",
    "CostMeter",
    "GuidanceMode",
    "SparseGuidance",
    "DiffusionForm",
    "NoiseSource",
    "PerSampleRNG",
    "SamplerSpec",
    "Solver",
    "cfg",
    "draw_plans",
    "edm_heun",
    "edm_sigmas",
    "flow_euler",
    "flow_euler_maruyama",
    "flow_heun",
    "flow_times",
    "randn_like",
    "routed_branch",
    "sample",
    "solver_options",
    "sparse_guidance",
]
