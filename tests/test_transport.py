"""Objectives: EDM preconditioning and loss, linear-path flow matching, option validation."""

from __future__ import annotations

import functools
import math
import warnings
from typing import get_args

import pytest
import torch
from torch import Tensor, nn

from tread import Route
from tread.errors import ConfigError
from tread.transport import EDM, OBJECTIVES, FlowMatching, ObjectiveName, build_objective
from tread.transport.flow import TimeSampling
from tread.transport.types import accepts_generator

from conftest import tiny_dit

B = 8
SHAPE = (B, 2, 4, 4)  # (B, C, H, W)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _point(dtype: torch.dtype = torch.float64) -> Tensor:
    """A dataset with a single point c, repeated over the batch: (B, C, H, W)."""
    c = torch.linspace(-1.0, 1.0, math.prod(SHAPE[1:]), dtype=dtype).reshape(SHAPE[1:])
    return c.expand(SHAPE).clone()


def _labels() -> Tensor:
    return torch.zeros(B, dtype=torch.long)


def _edm_net_for(edm: EDM, target_d, offset: float = 0.0):
    """Raw network F whose preconditioned denoiser is ``target_d(x, sigma) + offset * c_out``.

    Inverts the preconditioning: sigma = exp(4 c_noise), x = x_in / c_in,
    F = (D - c_skip x) / c_out.
    """

    def net(x_in: Tensor, c_noise: Tensor, y: Tensor) -> Tensor:
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1) for c in edm.precondition(sigma))
        x = x_in / c_in
        return (target_d(x, sigma) - c_skip * x) / c_out + offset

    return net


# --------------------------------------------------------------------------------------------
# EDM


def test_edm_preconditioning_at_sigma_data() -> None:
    edm = EDM()
    sd = edm.sigma_data
    sigma = torch.tensor([sd], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    torch.testing.assert_close(c_skip, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([sd / math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / (sd * math.sqrt(2))], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(sd) / 4], dtype=torch.float64))
    torch.testing.assert_close(
        edm.loss_weight(sigma), torch.tensor([2 / sd**2], dtype=torch.float64)
    )


@pytest.mark.parametrize("sigma", [0.002, 0.3, 1.0, 7.0, 80.0])
def test_edm_preconditioning_general(sigma: float) -> None:
    edm = EDM(sigma_data=0.7)
    s = torch.tensor([sigma], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(s)
    total = sigma**2 + 0.49
    assert c_skip.item() == pytest.approx(0.49 / total, rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * 0.7 / math.sqrt(total), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(total), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12, abs=1e-15)
    # EDM's design: lambda * c_out^2 == 1, so the raw network is regressed with unit weight.
    assert (edm.loss_weight(s) * c_out**2).item() == pytest.approx(1.0, rel=1e-12)


def test_edm_loss_zero_for_exact_denoiser() -> None:
    edm = EDM()
    x0 = _point()
    c = x0[0]
    net = _edm_net_for(edm, lambda x, sigma: c.expand_as(x))  # data is one point: D* = c
    loss = edm.loss(net, x0, _labels(), _gen())
    assert loss.shape == (B,)
    assert loss.dtype == torch.float64
    assert loss.abs().max().item() < 1e-18


def test_edm_loss_has_unit_weight_on_raw_output() -> None:
    # F = F* + delta gives D = D* + c_out * delta, so lambda * |D - x0|^2 = delta^2 at every sigma.
    edm = EDM()
    x0 = _point()
    c = x0[0]
    delta = 0.1
    net = _edm_net_for(edm, lambda x, sigma: c.expand_as(x), offset=delta)
    loss = edm.loss(net, x0, _labels(), _gen())
    torch.testing.assert_close(loss, torch.full((B,), delta**2, dtype=torch.float64))


def test_edm_loss_reproducible_and_draw_order() -> None:
    edm = EDM()
    x0 = torch.randn(SHAPE, generator=_gen(1))
    y = _labels()

    def net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return 0.3 * x + t.reshape(-1, 1, 1, 1)

    a = edm.loss(net, x0, y, _gen(5))
    b = edm.loss(net, x0, y, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, edm.loss(net, x0, y, _gen(6)))
    # Documented draw order: sigma, then noise.
    g = _gen(5)
    sigma = edm.sample_time(B, like=x0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(a, edm.loss_at(net, x0, y, sigma, noise))


def test_edm_sigma_distribution() -> None:
    edm = EDM(p_mean=-1.2, p_std=1.2)
    sigma = edm.sample_time(20_000, like=torch.zeros(1, dtype=torch.float64), generator=_gen())
    log_sigma = sigma.log()
    # Standard errors: 1.2 / sqrt(2e4) ~ 0.0085 for the mean, ~0.006 for the std.
    assert abs(log_sigma.mean().item() + 1.2) < 0.05
    assert abs(log_sigma.std().item() - 1.2) < 0.04


# --------------------------------------------------------------------------------------------
# Flow matching


def test_flow_interpolate_boundaries() -> None:
    flow = FlowMatching()
    x0, noise = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(B)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(B)), noise)


@pytest.mark.parametrize("time_sampling", get_args(TimeSampling))
def test_flow_loss_zero_for_exact_velocity(time_sampling: TimeSampling) -> None:
    # Single data point c: eps = (x_t - (1 - t) c) / t, so v* = eps - c = (x_t - c) / t.
    flow = FlowMatching(time_sampling=time_sampling)
    x0 = _point()
    c = x0[0]

    def net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return (x - c) / t.reshape(-1, 1, 1, 1)

    loss = flow.loss(net, x0, _labels(), _gen())
    assert loss.shape == (B,)
    assert loss.abs().max().item() < 1e-20
    # And a wrong net is penalised by exactly its squared error.
    loss_off = flow.loss(lambda x, t, y: net(x, t, y) + 0.5, x0, _labels(), _gen())
    torch.testing.assert_close(loss_off, torch.full((B,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("time_sampling", get_args(TimeSampling))
def test_flow_time_sampling_range_and_reproducibility(time_sampling: TimeSampling) -> None:
    flow = FlowMatching(time_sampling=time_sampling)
    like = torch.zeros(1)
    t = flow.sample_time(20_000, like=like, generator=_gen(3))
    assert t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert torch.equal(t, flow.sample_time(20_000, like=like, generator=_gen(3)))
    assert not torch.equal(t, flow.sample_time(20_000, like=like, generator=_gen(4)))


def test_flow_time_distributions() -> None:
    n, like = 20_000, torch.zeros(1, dtype=torch.float64)
    t = FlowMatching(time_sampling="uniform").sample_time(n, like=like, generator=_gen())
    # Uniform: mean 1/2 (SE 0.002), variance 1/12.
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs(t.var().item() - 1 / 12) < 0.004
    flow = FlowMatching(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = flow.sample_time(n, like=like, generator=_gen()).logit()
    # SE: 0.8 / sqrt(2e4) ~ 0.006 for the mean, ~0.004 for the std.
    assert abs(logit.mean().item() - 0.5) < 0.03
    assert abs(logit.std().item() - 0.8) < 0.02


def test_flow_loss_reproducible_and_draw_order() -> None:
    flow = FlowMatching(time_sampling="logit_normal")
    x0 = torch.randn(SHAPE, generator=_gen(1))
    y = _labels()

    def net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return -x * t.reshape(-1, 1, 1, 1)

    a = flow.loss(net, x0, y, _gen(5))
    assert torch.equal(a, flow.loss(net, x0, y, _gen(5)))
    g = _gen(5)
    t = flow.sample_time(B, like=x0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(a, flow.loss_at(net, x0, y, t, noise))


# --------------------------------------------------------------------------------------------
# Shared behaviour and validation


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.conv(x) * t.reshape(-1, 1, 1, 1).cos()


@pytest.mark.parametrize("name", get_args(ObjectiveName))
@pytest.mark.parametrize("training", [True, False])
def test_objectives_leave_mode_alone_and_backprop(name: ObjectiveName, training: bool) -> None:
    torch.manual_seed(0)  # parameter init only; the objective's draws use the generator
    net = _Tiny().train(training)
    objective = build_objective(name)
    loss = objective.loss(net, torch.randn(SHAPE, generator=_gen()), _labels(), _gen(1))
    assert net.training is training
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_build_objective_passes_options() -> None:
    edm = build_objective("edm", p_mean=-0.4, sigma_data=1.0)
    assert isinstance(edm, EDM) and edm.p_mean == -0.4 and edm.sigma_data == 1.0
    flow = build_objective("flow", time_sampling="logit_normal")
    assert isinstance(flow, FlowMatching) and flow.time_sampling == "logit_normal"
    assert set(OBJECTIVES) == set(get_args(ObjectiveName))


# --------------------------------------------------------------------------------------------
# learn_sigma: a network with 2C output channels (prediction first, variance second, as DiT's
# published checkpoints) is trained and sampled on its first C channels only.


def _learn_sigma_case(channels: int):
    model = tiny_dit(learn_sigma=True, in_channels=channels).eval()
    x0 = torch.randn(4, channels, 8, 8, generator=_gen(2))
    y = torch.tensor([0, 3, 7, 10])
    return model, x0, y


@pytest.mark.parametrize("name", get_args(ObjectiveName))
@pytest.mark.parametrize("channels", [1, 4])
def test_learn_sigma_loss_uses_the_first_channels(name: ObjectiveName, channels: int) -> None:
    model, x0, y = _learn_sigma_case(channels)
    objective = build_objective(name)
    loss = objective.loss(model, x0, y, _gen(5))
    first = objective.loss(lambda x, t, y_: model(x, t, y_)[:, :channels], x0, y, _gen(5))
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, first, rtol=0, atol=0)
    # And the variance channels take no part: the loss is not what broadcasting all 2C
    # channels against the C-channel target would give (C = 1 broadcasts, C = 4 cannot).
    g = _gen(5)
    time = objective.sample_time(4, like=x0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    if name == "edm":
        c_skip, c_out, c_in, c_noise = (
            c.reshape(-1, 1, 1, 1) for c in objective.precondition(time)
        )
        x = x0 + time.reshape(-1, 1, 1, 1) * noise
        out = model(c_in * x, c_noise.flatten(), y)  # (B, 2C, H, W)
        denoised = c_skip * x + c_out * out[:, :channels]
        expected = objective.loss_weight(time) * ((denoised - x0) ** 2).flatten(1).mean(1)
        if channels == 1:
            wrong = c_skip * x + c_out * out  # (B, 2, H, W): the old silent broadcast
            broadcast = objective.loss_weight(time) * ((wrong - x0) ** 2).flatten(1).mean(1)
    else:
        x_t = objective.interpolate(x0, noise, time)
        out = model(x_t, time, y)  # (B, 2C, H, W)
        expected = ((out[:, :channels] - (noise - x0)) ** 2).flatten(1).mean(1)
        broadcast = ((out - (noise - x0)) ** 2).flatten(1).mean(1) if channels == 1 else None
    torch.testing.assert_close(loss, expected)
    if channels == 1:
        assert not torch.allclose(loss, broadcast)


@pytest.mark.parametrize("name", get_args(ObjectiveName))
@pytest.mark.parametrize("out_channels", [1, 3, 8])
def test_output_shape_that_is_neither_c_nor_2c_is_refused(name, out_channels) -> None:
    # A (B, 1, ...) output against a 2-channel input would broadcast; 3 and 8 are just wrong.
    net = lambda x, t, y: x.new_zeros(x.shape[0], out_channels, *x.shape[2:])  # noqa: E731
    message = rf"output has shape \(8, {out_channels}, 4, 4\) for an input of shape \(8, 2, 4, 4\)"
    with pytest.raises(ValueError, match=message):
        build_objective(name).loss(net, torch.randn(SHAPE), _labels(), _gen())


# --------------------------------------------------------------------------------------------
# The objective's generator reaches the network's own draws (routing): no global RNG use.


@pytest.mark.parametrize("name", get_args(ObjectiveName))
def test_loss_routes_with_the_objective_generator_not_the_global_rng(name) -> None:
    model = tiny_dit(routes=[Route(1, 2, 0.5)]).train()
    objective = build_objective(name)
    x0 = torch.randn(3, 1, 8, 8, generator=_gen(1))
    y = torch.tensor([0, 4, 10])
    state = torch.get_rng_state()
    a = objective.loss(model, x0, y, _gen(5))
    b = objective.loss(model, x0, y, _gen(5))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG
    assert torch.equal(a, b)
    assert not torch.equal(a, objective.loss(model, x0, y, _gen(6)))
    # Documented draw order: time, noise, then the routing subsets inside the forward pass.
    g = _gen(5)
    time = objective.sample_time(3, like=x0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    routed = functools.partial(model, generator=g)
    assert torch.equal(a, objective.loss_at(routed, x0, y, time, noise))
    # The draw matters: the dense network gives another loss.
    assert not torch.equal(a, objective.loss_at(model.eval(), x0, y, time, noise))


class _WithGenerator(nn.Module):
    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, generator=None) -> Tensor:
        return x


class _KwargsOnly(nn.Module):
    def forward(self, x: Tensor, t: Tensor, y: Tensor, **kwargs) -> Tensor:
        return x


def _with_generator(x, t, y, generator=None):
    return x


def _compiled() -> nn.Module:
    with warnings.catch_warnings():  # torch.compile's import warns about torch.jit internals
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.compile(_WithGenerator())  # only wrapped here; nothing is compiled


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_WithGenerator, True, id="module-with-generator"),
        pytest.param(_compiled, True, id="torch.compile-wrapper"),
        pytest.param(lambda: nn.DataParallel(_WithGenerator()), True, id="DataParallel"),
        pytest.param(lambda: _with_generator, True, id="function"),
        pytest.param(
            lambda: functools.partial(_with_generator, generator=None), False, id="bound-partial"
        ),
        pytest.param(lambda: functools.partial(_WithGenerator(), y=None), True, id="partial"),
        pytest.param(_Tiny, False, id="module-xty"),
        pytest.param(_KwargsOnly, False, id="kwargs-only"),  # **kwargs alone is not trusted
        pytest.param(lambda: lambda x, t, y: x, False, id="lambda-xty"),
        pytest.param(lambda: torch.neg, False, id="builtin"),  # no signature to read
    ],
)
def test_accepts_generator(make, expected: bool) -> None:
    net = make()
    assert accepts_generator(net) is expected
    assert accepts_generator(net) is expected  # the cached answer agrees


@pytest.mark.parametrize("name", get_args(ObjectiveName))
def test_plain_three_argument_callables_get_no_generator(name) -> None:
    calls = []

    def net(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        calls.append((x.shape, t.shape, y.shape))
        return torch.zeros_like(x)

    loss = build_objective(name).loss(net, torch.randn(SHAPE), _labels(), _gen())
    assert calls == [(SHAPE, (B,), (B,))] and torch.isfinite(loss).all()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: EDM(p_std=0.0), "p_std"),
        (lambda: EDM(p_mean=math.nan), "p_mean"),
        (lambda: EDM(sigma_data=-0.5), "sigma_data"),
        (lambda: FlowMatching(time_sampling="cosine"), "time_sampling"),  # type: ignore[arg-type]
        (lambda: FlowMatching(logit_std=0.0), "logit_std"),
        (lambda: FlowMatching(t_eps=0.5), "t_eps"),
        (lambda: FlowMatching(t_eps=-1e-3), "t_eps"),
        (lambda: build_objective("ddpm"), "ddpm"),  # type: ignore[arg-type]
        (lambda: build_objective("edm", p_meen=0.0), "p_meen"),
    ],
)
def test_bad_options_raise_config_error(make, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        make()
    assert "\n" not in str(info.value)
