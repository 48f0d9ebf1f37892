"""Samplers on a Gaussian target with closed-form denoiser/velocity, guidance, per-sample seeds.

Target: x0 ~ N(mu, diag(s^2)) in 2-D. Closed forms:
    EDM, x = x0 + sigma n:         D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)
    flow, x_t = (1-t) x0 + t eps:  v(x, t) = -mu + (t - (1-t) s^2) / V_t (x - (1-t) mu),
                                    V_t = (1-t)^2 s^2 + t^2.
For a deterministic sampler the exact ODE map is affine per dimension: z -> mu + s z for flow
(t = 1 is exactly N(0, I)), and z -> mu + s (sigma_max z - mu) / sqrt(s^2 + sigma_max^2) for EDM
(which starts from N(0, sigma_max^2) instead of the true N(mu, s^2 + sigma_max^2)).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import get_args

import pytest
import torch
from torch import Tensor

from tread.errors import ConfigError
from tread.sampling import (
    SAMPLERS,
    DiffusionForm,
    PerSampleRNG,
    cfg,
    edm_heun,
    edm_sigmas,
    flow_euler,
    flow_euler_maruyama,
    flow_heun,
    flow_times,
    sample,
    solver_options,
)
from tread.transport import EDM, FlowMatching

from conftest import tiny_dit

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)
N = 16_384  # samples; ~0.1 s per sampler at these step counts
SIGMA_MAX = 80.0
NUM_CLASSES = 10


def exact_denoiser(x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
    sigma2 = sigma.reshape(-1, 1) ** 2  # (B,) -> (B, 1)
    return MU + S**2 / (S**2 + sigma2) * (x - MU)


def exact_velocity(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    t = t.reshape(-1, 1)  # (B,) -> (B, 1)
    var_t = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / var_t * (x - (1 - t) * MU)


def edm_net(edm: EDM):
    """Raw network whose EDM-preconditioned denoiser is ``exact_denoiser``."""

    def net(x_in: Tensor, c_noise: Tensor, y: Tensor) -> Tensor:
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1) for c in edm.precondition(sigma))
        x = x_in / c_in
        return (exact_denoiser(x, sigma, y) - c_skip * x) / c_out

    return net


@pytest.fixture(scope="module")
def z() -> Tensor:
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _y(n: int = N) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def _rng(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_moments(x: Tensor, bias: float) -> None:
    """Mean and std match (mu, s) within 5 standard errors plus a discretisation budget ``bias``.

    Both are measured in units of s: SE(mean)/s = 1/sqrt(N) ~ 0.0078 and SE(std)/s ~
    1/sqrt(2N) ~ 0.0055 at N = 16384. The seeds are fixed, so the check is deterministic; 5 SE
    keeps it robust to a reseed, while sign errors or a missing/ doubled noise term move these
    statistics by tens of SE.
    """
    mean_err = ((x.mean(0) - MU) / S).abs()
    std_err = (x.std(0) / S - 1).abs()
    assert (mean_err < 5 / math.sqrt(N) + bias).all(), mean_err
    assert (std_err < 5 / math.sqrt(2 * N) + bias).all(), std_err


# --------------------------------------------------------------------------------------------
# Convergence on the Gaussian target


# Deterministic samplers: per-sample error against the exact affine ODE map. The tolerances are
# about 2x the measured max error over 16384 samples (the worst sample sits at |z| ~ 4), which
# shrinks at the solver's order: /4 per doubling of steps for Heun, /2 for Euler.
DETERMINISTIC = [
    ("edm_heun", edm_heun, {"steps": 80}, 0.025),  # measured 0.011
    ("flow_euler", flow_euler, {"steps": 200}, 0.08),  # measured 0.043
    ("flow_euler_tmin", flow_euler, {"steps": 200, "t_min": 0.01}, 0.08),
    ("flow_heun", flow_heun, {"steps": 20}, 0.01),  # measured 0.0043
    ("flow_heun_tmin", flow_heun, {"steps": 20, "t_min": 0.02}, 0.01),  # measured 0.0046
    ("flow_em_no_diffusion", flow_euler_maruyama, {"steps": 200, "diffusion_scale": 0.0}, 0.08),
]


@pytest.mark.parametrize(("name", "solver", "options", "tol"), DETERMINISTIC)
def test_deterministic_samplers_follow_exact_map(name, solver, options, tol, z: Tensor) -> None:
    if name.startswith("edm"):
        x = solver(exact_denoiser, z, _y(), **options)
        expected = MU + S * (SIGMA_MAX * z - MU) / (S**2 + SIGMA_MAX**2).sqrt()
    else:
        x = solver(exact_velocity, z, _y(), **options)
        expected = MU + S * z
    assert x.dtype == z.dtype and x.shape == z.shape
    assert (x - expected).abs().max().item() < tol
    # The EDM start-point mismatch shifts the mean by up to s/sigma_max*|mu| ~ 0.04 s.
    _assert_moments(x, bias=0.05 if name.startswith("edm") else 0.02)


# Stochastic samplers: moments only. Biases measured with 65536 samples at these settings are
# <= 0.01 (churn) and <= 0.003 (Euler-Maruyama); 0.015 leaves room without hiding real errors.
STOCHASTIC = [
    (edm_heun, {"steps": 80, "s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    (flow_euler_maruyama, {"steps": 200}),
    (flow_euler_maruyama, {"steps": 200, "diffusion": "constant", "t_min": 0.02}),
    (flow_euler_maruyama, {"steps": 200, "diffusion_scale": 2.0, "t_min": 0.01}),
]


@pytest.mark.parametrize(("solver", "options"), STOCHASTIC)
def test_stochastic_samplers_recover_moments(solver, options, z: Tensor) -> None:
    fn = exact_denoiser if solver is edm_heun else exact_velocity
    x = solver(fn, z, _y(), rng=_rng(), **options)
    _assert_moments(x, bias=0.015 + (0.04 if solver is edm_heun else 0.0))
    # Truly stochastic: a different rng gives different samples from the same initial noise.
    other = solver(fn, z[:64], _y(64), rng=_rng(2), **options)
    assert not torch.allclose(x[:64], other)


def test_churn_is_not_a_no_op(z: Tensor) -> None:
    options = {"steps": 20, "s_tmin": 0.05, "s_tmax": 50.0}
    plain = edm_heun(exact_denoiser, z[:64], _y(64), **options)
    churned = edm_heun(exact_denoiser, z[:64], _y(64), s_churn=10.0, rng=_rng(), **options)
    assert not torch.allclose(plain, churned)


class _Spy:
    """Wraps a prediction callable and records each call's (x, time)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, x: Tensor, time: Tensor, y: Tensor) -> Tensor:
        self.calls.append((x.clone(), time.clone()))
        return self.fn(x, time, y)


@pytest.mark.parametrize(
    ("s_churn", "s_tmax", "first_sigma"),
    [
        (0.8, math.inf, 80.0 * 1.2),  # gamma = s_churn / steps = 0.2
        (1e6, math.inf, 80.0 * math.sqrt(2)),  # gamma capped at sqrt(2) - 1
        (1e6, 10.0, 80.0),  # sigma_max outside [s_tmin, s_tmax]: no churn
    ],
)
def test_churn_raises_sigma_as_in_algorithm_2(s_churn, s_tmax, first_sigma) -> None:
    spy = _Spy(exact_denoiser)
    noise = torch.randn(3, 2, generator=_rng(), dtype=torch.float64)
    edm_heun(spy, noise, _y(3), steps=4, s_churn=s_churn, s_tmax=s_tmax, rng=_rng())
    assert spy.calls[0][1].tolist() == pytest.approx([first_sigma] * 3)
    assert len(spy.calls) == 2 * 4 - 1  # Heun everywhere except the last step to sigma = 0


@pytest.mark.parametrize("t_min", [0.0, 0.05])
@pytest.mark.parametrize("diffusion", get_args(DiffusionForm))
def test_euler_maruyama_returns_denoised_mean(t_min: float, diffusion: DiffusionForm) -> None:
    # The last step is deterministic: output = x - t v(x, t) = E[x0 | x_t] at the last state.
    spy = _Spy(exact_velocity)
    noise = torch.randn(3, 2, generator=_rng(), dtype=torch.float64)
    out = flow_euler_maruyama(
        spy, noise, _y(3), steps=5, rng=_rng(), diffusion=diffusion, t_min=t_min
    )
    x_last, t_last = spy.calls[-1]
    expected = x_last - t_last.reshape(-1, 1) * exact_velocity(x_last, t_last, _y(3))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert len(spy.calls) == (5 if t_min == 0 else 6)


def test_schedules() -> None:
    sigmas = edm_sigmas(5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert len(sigmas) == 6 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in pairwise(sigmas))
    assert edm_sigmas(1, sigma_min=0.002, sigma_max=80.0, rho=7.0) == [pytest.approx(80.0), 0.0]
    assert flow_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    ts = flow_times(2, 0.1)
    assert ts == [1.0, pytest.approx(0.55), pytest.approx(0.1), 0.0]


# --------------------------------------------------------------------------------------------
# Guidance


class _Recorder:
    """Prediction callable that depends on the label and records each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: Tensor, time: Tensor, y: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        # cond and uncond differ by a label-dependent offset, so the mix is checkable.
        return x * time.reshape(-1, 1) + y.reshape(-1, 1).to(x.dtype)


def _guidance_inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(6, 2, generator=_rng(), dtype=torch.float64)
    time = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    return x, time, y


def test_guidance_scale_one_is_the_conditional_model() -> None:
    fn = _Recorder()
    guided = cfg(fn, 1.0, NUM_CLASSES)
    assert guided is fn
    x, time, y = _guidance_inputs()
    assert torch.equal(guided(x, time, y), fn(x, time, y))


def test_guidance_outside_interval_is_conditional_with_one_pass() -> None:
    fn = _Recorder()
    guided = cfg(fn, 4.0, NUM_CLASSES, interval=(2.0, 5.0))
    x, time, y = _guidance_inputs()
    out = guided(x, time, y)
    assert fn.batches == [6]  # no unconditional pass at all
    assert torch.equal(out, fn(x, time, y))


def test_guidance_formula_one_batched_call() -> None:
    fn = _Recorder()
    scale = 3.0
    x, time, y = _guidance_inputs()
    out = cfg(fn, scale, NUM_CLASSES)(x, time, y)
    assert fn.batches == [12]  # cond and null-label halves in one call
    cond = fn(x, time, y)
    uncond = fn(x, time, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out, uncond + scale * (cond - uncond))


def test_guidance_interval_is_per_sample_and_inclusive() -> None:
    fn = _Recorder()
    scale = 2.5
    x, time, y = _guidance_inputs()
    out = cfg(fn, scale, NUM_CLASSES, interval=(0.3, 0.7))(x, time, y)
    assert fn.batches == [6 + 3]  # unconditional pass only for t in {0.3, 0.5, 0.7}
    cond = fn(x, time, y)
    uncond = fn(x, time, torch.full_like(y, NUM_CLASSES))
    inside = torch.tensor([False, True, True, True, False, False])
    expected = torch.where(inside.reshape(-1, 1), uncond + scale * (cond - uncond), cond)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~inside], cond[~inside])


def test_guidance_with_separate_unconditional_callable() -> None:
    fn, other = _Recorder(), _Recorder()
    x, time, y = _guidance_inputs()
    out = cfg(fn, 2.0, NUM_CLASSES, uncond_fn=other)(x, time, y)
    assert fn.batches == [6] and other.batches == [6]
    cond = fn(x, time, y)
    uncond = other(x, time, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond))


def test_sample_with_guidance_runs_and_differs() -> None:
    flow = FlowMatching()
    noise = PerSampleRNG(range(4)).randn((2,), dtype=torch.float64)

    def net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        # Independent of x, so the guided shift of the velocity integrates exactly.
        return t.reshape(-1, 1) * MU + 0.1 * (y == NUM_CLASSES).reshape(-1, 1)

    kwargs = {"sampler": "flow_heun", "steps": 4, "null_label": NUM_CLASSES}
    plain = sample(flow, net, noise, _y(4), **kwargs)
    guided = sample(flow, net, noise, _y(4), guidance=3.0, **kwargs)
    assert not torch.allclose(plain, guided)
    # uncond = cond + 0.1, so the guided velocity is cond - 0.2; integrated over dt = -1 the
    # sample moves by +0.2.
    torch.testing.assert_close(guided, plain + 0.2)


# --------------------------------------------------------------------------------------------
# Per-sample randomness


def test_per_sample_rng_is_batch_size_invariant() -> None:
    seeds = [101, 102, 103, 104, 105]
    batch = PerSampleRNG(seeds).randn((3, 2), dtype=torch.float64)
    assert batch.shape == (5, 3, 2) and batch.dtype == torch.float64
    for i, seed in enumerate(seeds):
        assert torch.equal(
            batch[i : i + 1], PerSampleRNG([seed]).randn((3, 2), dtype=torch.float64)
        )
    like = PerSampleRNG(seeds).randn_like(batch)
    assert torch.equal(like, batch)


@pytest.mark.parametrize(
    ("objective", "net", "sampler", "options"),
    [
        (EDM(), None, "edm_heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
        (FlowMatching(), exact_velocity, "flow_euler_maruyama", {}),
        (FlowMatching(), exact_velocity, "flow_euler_maruyama", {"diffusion": "constant"}),
    ],
)
def test_sample_i_identical_at_any_batch_size(objective, net, sampler, options) -> None:
    net = edm_net(objective) if net is None else net
    seeds = [7, 8, 9, 10, 11]
    y = torch.zeros(5, dtype=torch.long)

    def run(ids: list[int]) -> Tensor:
        rng = PerSampleRNG([seeds[i] for i in ids])
        noise = rng.randn((2,), dtype=torch.float64)
        return sample(objective, net, noise, y[ids], sampler=sampler, steps=12, rng=rng, **options)

    full = run(list(range(5)))
    for i in range(5):
        single = run([i])
        if sampler.startswith("flow"):
            # Elementwise +, *, / only: IEEE-exact whatever the batch layout.
            assert torch.equal(single, full[i : i + 1])
        else:
            # exp/log in the preconditioning may take vectorised or scalar kernels depending on
            # the batch size; those can differ in the last ulp on some CPUs.
            torch.testing.assert_close(single, full[i : i + 1], rtol=1e-12, atol=1e-12)


def test_sample_runs_without_grad() -> None:
    flow = FlowMatching()
    noise = torch.randn(3, 2, generator=_rng(), requires_grad=True)
    out = sample(flow, lambda x, t, y: -x, noise, _y(3), sampler="flow_euler", steps=2)
    assert not out.requires_grad


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_mismatched_sampler_and_objective_raise(sampler: str) -> None:
    wrong = FlowMatching() if SAMPLERS[sampler].objective == "edm" else EDM()
    noise = torch.randn(2, 2, generator=_rng())
    with pytest.raises(ConfigError, match=sampler):
        sample(wrong, exact_velocity, noise, _y(2), sampler=sampler, steps=2)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_registered_sampler_runs(sampler: str) -> None:
    spec = SAMPLERS[sampler]
    objective = EDM() if spec.objective == "edm" else FlowMatching()
    net = edm_net(objective) if spec.objective == "edm" else exact_velocity
    noise = PerSampleRNG([0, 1]).randn((2,), dtype=torch.float64)
    out = sample(objective, net, noise, _y(2), sampler=sampler, steps=3, rng=PerSampleRNG([0, 1]))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert solver_options(sampler)  # every sampler has at least one option


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_a_learn_sigma_model_on_its_first_channels(sampler: str) -> None:
    # DiT's learn_sigma: 2C output channels, the prediction first. Sampling integrates only the
    # prediction, so it equals sampling the network cut to its first C channels.
    channels = 4
    model = tiny_dit(learn_sigma=True, in_channels=channels).eval()
    objective = EDM() if SAMPLERS[sampler].objective == "edm" else FlowMatching()
    seeds = [0, 1, 2]
    noise = PerSampleRNG(seeds).randn((channels, 8, 8))
    y = torch.tensor([1, 5, 10])

    def run(net) -> Tensor:
        return sample(objective, net, noise, y, sampler=sampler, steps=3, rng=PerSampleRNG(seeds))

    out = run(model)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, run(lambda x, t, y_: model(x, t, y_)[:, :channels]))
    guided = sample(
        objective,
        model,
        noise,
        y,
        sampler=sampler,
        steps=3,
        rng=PerSampleRNG(seeds),
        guidance=2.0,
        null_label=10,
    )
    assert guided.shape == noise.shape and not torch.allclose(guided, out)


@pytest.mark.parametrize("diffusion", get_args(DiffusionForm))
def test_every_diffusion_form_runs(diffusion: DiffusionForm) -> None:
    noise = torch.randn(4, 2, generator=_rng(), dtype=torch.float64)
    out = flow_euler_maruyama(
        exact_velocity, noise, _y(4), steps=5, rng=_rng(), diffusion=diffusion, t_min=0.05
    )
    assert torch.isfinite(out).all()


_NOISE = torch.zeros(2, 2)


def _flow_sample(**options) -> Tensor:
    return sample(
        FlowMatching(), exact_velocity, _NOISE, _y(2), sampler="flow_euler", steps=2, **options
    )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: sample(EDM(), exact_velocity, _NOISE, _y(2), sampler="ddim", steps=2), "ddim"),
        (lambda: _flow_sample(s_churn=1.0), "s_churn"),
        (lambda: _flow_sample(guidance=2.0), "null_label"),
        (lambda: edm_heun(exact_denoiser, _NOISE, _y(2), steps=0), "steps"),
        (lambda: edm_heun(exact_denoiser, _NOISE, _y(2), steps=2, rho=0.0), "rho"),
        (lambda: edm_heun(exact_denoiser, _NOISE, _y(2), steps=2, sigma_min=100.0), "sigma_min"),
        (lambda: edm_heun(exact_denoiser, _NOISE, _y(2), steps=2, s_churn=1.0), "rng"),
        (lambda: edm_heun(exact_denoiser, _NOISE, _y(2), steps=2, s_noise=-1.0), "s_noise"),
        (lambda: flow_euler(exact_velocity, _NOISE, _y(2), steps=2, t_min=1.0), "t_min"),
        (lambda: flow_heun(exact_velocity, _NOISE, _y(2), steps=1.5), "steps"),
        (lambda: flow_euler_maruyama(exact_velocity, _NOISE, _y(2), steps=2), "rng"),
        (
            lambda: flow_euler_maruyama(
                exact_velocity, _NOISE, _y(2), steps=2, rng=_rng(), diffusion="bogus"
            ),
            "diffusion",
        ),
        (
            lambda: flow_euler_maruyama(
                exact_velocity, _NOISE, _y(2), steps=2, rng=_rng(), diffusion_scale=-1.0
            ),
            "diffusion_scale",
        ),
        (lambda: cfg(exact_velocity, -1.0, NUM_CLASSES), "scale"),
        (lambda: cfg(exact_velocity, 2.0, NUM_CLASSES, interval=(1.0, 0.5)), "interval"),
        (lambda: PerSampleRNG([]), "seeds"),
    ],
)
def test_bad_options_raise_config_error(call, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        call()
    assert "\n" not in str(info.value)
