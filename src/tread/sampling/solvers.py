"""Samplers with one signature: ``solver(fn, noise, y, *, steps, rng=None, **options) -> x0``.

``fn`` is the objective's prediction callable: the EDM denoiser D(x, sigma, y) for ``edm_heun``,
the flow velocity v(x, t, y) for the ``flow_*`` samplers (linear path, t = 1 noise, t = 0 data;
see ``tread.transport.flow``). ``noise`` is always unit Gaussian (B, ...); each sampler scales it
to its starting point itself (times sigma_max for EDM, unchanged for flow). ``rng`` feeds the
stochastic steps; pass a ``PerSampleRNG`` to keep sample i independent of the batch size.
Samplers do not switch gradients off; ``tread.sampling.sample`` does.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.transport.types import Prediction

from .rng import NoiseSource, randn_like

DiffusionForm = Literal["sigma", "constant"]


class Solver(Protocol):
    """The shared sampler signature."""

    def __call__(
        self,
        fn: Prediction,
        noise: Tensor,
        y: Tensor,
        *,
        steps: int,
        rng: NoiseSource | None = None,
        **options: Any,
    ) -> Tensor: ...


def _check_steps(solver: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{solver}: steps must be an integer >= 1, got {steps!r}")


def edm_sigmas(steps: int, *, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """Karras noise levels sigma_max = s_0 > ... > s_{N-1} = sigma_min, then 0 (EDM Eq. 5).

    Computed on the host in float64 so the schedule does not depend on the sampling dtype.

    Args:
        steps: number of nonzero levels N.
        sigma_min, sigma_max, rho: schedule parameters.

    Returns:
        N + 1 noise levels ending in 0.
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # steps == 1 gives [0] -> sigma_max
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist() + [0.0]


def edm_heun(
    fn: Prediction,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 40,
    rng: NoiseSource | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s_churn: float = 0.0,  # total churn; 0 is the deterministic sampler
    s_tmin: float = 0.0,  # churn only where s_tmin <= sigma <= s_tmax
    s_tmax: float = math.inf,
    s_noise: float = 1.0,  # std multiplier of the churn noise
) -> Tensor:
    """EDM stochastic/deterministic Heun sampler (Karras et al. 2022, Algorithm 2).

    ``steps`` is the number of nonzero noise levels N; it costs 2N - 1 evaluations because the
    final step, to sigma = 0, is plain Euler.

    Args:
        fn: denoiser D(x, sigma, y).
        noise: (B, ...) unit Gaussian noise; scaled by sigma_max here.
        y: (B,) labels.
        steps: number of noise levels N >= 1.
        rng: noise source for churn; required when s_churn > 0.

    Returns:
        (B, ...) samples.
    """
    _check_steps("edm_heun", steps)
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ConfigError(
            f"edm_heun: need 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, {sigma_max!r}"
        )
    if not (math.isfinite(rho) and rho > 0):
        raise ConfigError(f"edm_heun: rho must be a finite number > 0, got {rho!r}")
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ConfigError(f"edm_heun: s_churn must be a finite number >= 0, got {s_churn!r}")
    if not (math.isfinite(s_noise) and s_noise >= 0):
        raise ConfigError(f"edm_heun: s_noise must be a finite number >= 0, got {s_noise!r}")
    if s_churn > 0 and rng is None:
        raise ConfigError(f"edm_heun: s_churn={s_churn!r} is stochastic and needs rng")

    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    batch = noise.shape[0]
    x = noise * sigmas[0]
    for sigma, sigma_next in pairwise(sigmas):
        # Churn: raise the noise level by gamma, adding fresh noise (Alg. 2, lines 4-6).
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            assert rng is not None  # checked above
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, rng)
        d = (x - fn(x, noise.new_full((batch,), sigma_hat), y)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            # Heun correction (Alg. 2, lines 9-11); skipped for the last step to sigma = 0.
            d_next = (x_next - fn(x_next, noise.new_full((batch,), sigma_next), y)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


def flow_times(steps: int, t_min: float = 0.0) -> list[float]:
    """Uniform host-side grid from t = 1 to t = t_min, with a final 0 appended when t_min > 0.

    Args:
        steps: number of intervals between 1 and t_min.
        t_min: last time of the uniform grid, in [0, 1).

    Returns:
        steps + 1 times, or steps + 2 when t_min > 0.
    """
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64).tolist()
    return ts + [0.0] if t_min > 0 else ts


def _check_t_min(solver: str, t_min: float) -> None:
    if not 0 <= t_min < 1:
        raise ConfigError(f"{solver}: t_min must be in [0, 1), got {t_min!r}")


def flow_euler(
    fn: Prediction,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 50,
    rng: NoiseSource | None = None,
    t_min: float = 0.0,
) -> Tensor:
    """Euler ODE solver for the flow, from t = 1 to t = 0.

    With t_min > 0 the uniform grid stops at t_min and one extra Euler step jumps to 0; for the
    linear path that jump is exactly the denoised mean x - t * v = E[x0 | x_t].

    Args:
        fn: velocity v(x, t, y).
        noise: (B, ...) unit Gaussian noise, the state at t = 1.
        y: (B,) labels.
        steps: number of uniform intervals between 1 and t_min.
        rng: unused (deterministic); accepted for the shared signature.
        t_min: where the uniform grid stops.

    Returns:
        (B, ...) samples.
    """
    _check_steps("flow_euler", steps)
    _check_t_min("flow_euler", t_min)
    ts = flow_times(steps, t_min)
    batch = noise.shape[0]
    x = noise
    for t, t_next in pairwise(ts):
        x = x + (t_next - t) * fn(x, noise.new_full((batch,), t), y)
    return x


def flow_heun(
    fn: Prediction,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 50,
    rng: NoiseSource | None = None,
    t_min: float = 0.0,
) -> Tensor:
    """Heun (2nd-order) ODE solver for the flow, from t = 1 to t = 0.

    Every step on the uniform grid is corrected, including the one landing on t = 0 (the linear
    path's velocity is finite there). With t_min > 0 the final jump from t_min to 0 is Euler,
    i.e. the denoised mean, so the velocity is never evaluated below t_min.

    Args:
        fn: velocity v(x, t, y).
        noise: (B, ...) unit Gaussian noise, the state at t = 1.
        y: (B,) labels.
        steps: number of uniform intervals between 1 and t_min; 2 evaluations each.
        rng: unused (deterministic); accepted for the shared signature.
        t_min: where the uniform grid stops.

    Returns:
        (B, ...) samples.
    """
    _check_steps("flow_heun", steps)
    _check_t_min("flow_heun", t_min)
    ts = flow_times(steps, t_min)
    batch = noise.shape[0]
    x = noise
    for i, (t, t_next) in enumerate(pairwise(ts)):
        dt = t_next - t
        v = fn(x, noise.new_full((batch,), t), y)
        x_next = x + dt * v
        if i < steps:  # on the uniform grid; the optional jump t_min -> 0 stays Euler
            v_next = fn(x_next, noise.new_full((batch,), t_next), y)
            x_next = x + dt * 0.5 * (v + v_next)
        x = x_next
    return x


def flow_euler_maruyama(
    fn: Prediction,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 250,
    rng: NoiseSource | None = None,
    t_min: float = 0.0,
    diffusion: DiffusionForm = "sigma",
    diffusion_scale: float = 1.0,
) -> Tensor:
    """Euler-Maruyama for the reverse SDE with the flow's marginals, from t = 1 to t = 0.

    dx = [v - g(t)^2 / 2 * score] dt + g(t) dW (dt < 0), with the linear-path conversion
    score(x, t) = -(x + (1 - t) * v) / t (from E[eps | x_t] = x_t + (1 - t) v).
    ``diffusion`` picks g(t)^2 = 2 w t ("sigma", vanishes at the data end) or 2 w ("constant",
    whose drift blows up like 1/t: use t_min > 0), with w = ``diffusion_scale``; w = 0 is the
    ODE. Any step that lands on t = 0 is deterministic Euler, which for the linear path is the
    denoised mean E[x0 | x_t]: the returned samples carry no last-step noise.

    Args:
        fn: velocity v(x, t, y).
        noise: (B, ...) unit Gaussian noise, the state at t = 1.
        y: (B,) labels.
        steps: number of uniform intervals between 1 and t_min.
        rng: noise source for the stochastic steps (required unless diffusion_scale == 0).
        t_min: where the uniform grid stops (then one deterministic jump to 0).
        diffusion: form of g(t)^2.
        diffusion_scale: w >= 0.

    Returns:
        (B, ...) samples.
    """
    _check_steps("flow_euler_maruyama", steps)
    _check_t_min("flow_euler_maruyama", t_min)
    if diffusion not in get_args(DiffusionForm):
        raise ConfigError(
            f"flow_euler_maruyama: diffusion must be one of "
            f"{', '.join(get_args(DiffusionForm))}, got {diffusion!r}"
        )
    if not (math.isfinite(diffusion_scale) and diffusion_scale >= 0):
        raise ConfigError(
            f"flow_euler_maruyama: diffusion_scale must be a finite number >= 0, "
            f"got {diffusion_scale!r}"
        )
    if diffusion_scale > 0 and rng is None:
        raise ConfigError(
            f"flow_euler_maruyama: diffusion_scale={diffusion_scale!r} is stochastic and needs rng"
        )

    ts = flow_times(steps, t_min)
    batch = noise.shape[0]
    x = noise
    for t, t_next in pairwise(ts):
        dt = t_next - t  # < 0
        v = fn(x, noise.new_full((batch,), t), y)
        if t_next == 0 or diffusion_scale == 0:
            x = x + dt * v
            continue
        g2 = 2 * diffusion_scale * (t if diffusion == "sigma" else 1.0)
        score = -(x + (1 - t) * v) / t
        drift = v - 0.5 * g2 * score
        assert rng is not None  # checked above
        x = x + dt * drift + math.sqrt(g2 * -dt) * randn_like(x, rng)
    return x
