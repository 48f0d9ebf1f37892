"""Samplers (one signature), classifier-free guidance and per-sample randomness."""

from __future__ import annotations

from .guidance import cfg
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

__all__ = [
    "SAMPLERS",
    "DiffusionForm",
    "NoiseSource",
    "PerSampleRNG",
    "SamplerSpec",
    "Solver",
    "cfg",
    "edm_heun",
    "edm_sigmas",
    "flow_euler",
    "flow_euler_maruyama",
    "flow_heun",
    "flow_times",
    "randn_like",
    "sample",
    "solver_options",
]
