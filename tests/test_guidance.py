"""Sparse guidance (SG, CFG+SG): the wrapper's formula, explicit routes per branch, per-sample
routing draws, EDM and flow predictions, the guidance interval, cost accounting and config checks.
"""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
import torch
from torch import Tensor

from tread.config import load_config
from tread.cost import forward_flops
from tread.errors import ConfigError
from tread.generate import cost_meter, generate, with_guidance
from tread.routing import Route
from tread.sampling import (
    CostMeter,
    GuidanceMode,
    PerSampleRNG,
    SparseGuidance,
    draw_plans,
    sample,
    sparse_guidance,
)
from tread.train.builders import build_from_config, objective_from_config

from conftest import TINY_MODEL

NULL = 10
SHAPE = [*TINY_MODEL, "model.input_size=8", "model.in_channels=1", "model.num_classes=10"]
FLOW = ["objective.name=flow", "sample.sampler=flow_euler"]


def tiny_run(*overrides: str):
    """(model, config): the 3-block routed digits DiT (route 1..1 at 0.5), weights perturbed
    so that every path carries signal (DiT zero-initialises its output layers)."""
    config = load_config("digits_tread", [*SHAPE, "sample.steps=3", *overrides])
    model = build_from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval(), config


class Branch:
    """A recording branch: prediction = x * factor + label (so the label used is visible)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.calls: list[tuple[list[int], list[int]]] = []  # (rows, labels) per call

    def __call__(self, x: Tensor, time: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        self.calls.append((rows.tolist(), y.tolist()))
        return x * self.factor + y.reshape(-1, 1).to(x.dtype)


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    time = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    return x, time, torch.tensor([1, 2, 3, 4])


# --------------------------------------------------------------------------------------------
# The wrapper


@pytest.mark.parametrize("null_label", [None, NULL])  # SG: weak conditional; CFG+SG: null label
def test_sparse_guidance_formula_and_branch_labels(null_label) -> None:
    strong, weak = Branch(2.0), Branch(0.5)
    x, time, y = _inputs()
    omega = 1.7
    out = sparse_guidance(strong, weak, omega, null_label=null_label)(x, time, y)
    weak_y = y if null_label is None else torch.full_like(y, NULL)
    expected = omega * (2.0 * x + y.reshape(-1, 1)) + (1 - omega) * (
        0.5 * x + weak_y.reshape(-1, 1)
    )
    torch.testing.assert_close(out, expected)
    assert strong.calls == [([0, 1, 2, 3], [1, 2, 3, 4])]  # the strong branch: conditional
    assert weak.calls == [([0, 1, 2, 3], weak_y.tolist())]


def test_sparse_guidance_weight_one_is_the_strong_branch_alone() -> None:
    strong, weak = Branch(2.0), Branch(0.5)
    x, time, y = _inputs()
    out = sparse_guidance(strong, weak, 1.0)(x, time, y)
    assert torch.equal(out, 2.0 * x + y.reshape(-1, 1))
    assert len(strong.calls) == 1 and weak.calls == []  # cost: one call


def test_sparse_guidance_interval_is_per_sample_and_inclusive() -> None:
    strong, weak = Branch(2.0), Branch(0.5)
    x, time, y = _inputs()
    out = sparse_guidance(strong, weak, 3.0, null_label=NULL, interval=(0.4, 0.6))(x, time, y)
    # Only samples 1 and 2 (t = 0.4, 0.6) get the weak branch, told their rows in the batch.
    assert weak.calls == [([1, 2], [NULL, NULL])]
    cond = 2.0 * x + y.reshape(-1, 1)
    assert torch.equal(out[[0, 3]], cond[[0, 3]])  # outside: the strong conditional branch
    uncond = 0.5 * x[1:3] + NULL
    torch.testing.assert_close(out[1:3], uncond + 3.0 * (cond[1:3] - uncond))
    # No sample inside: one strong call and nothing else.
    strong2, weak2 = Branch(2.0), Branch(0.5)
    sparse_guidance(strong2, weak2, 3.0, interval=(5.0, 6.0))(x, time, y)
    assert len(strong2.calls) == 1 and weak2.calls == []


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"strong_ratio": 0.5, "weak_ratio": 0.5, "spans": ((1, 1),)}, "below"),
        ({"strong_ratio": 0.0, "weak_ratio": 1.0, "spans": ((1, 1),)}, "weak_ratio=1.0"),
        ({"strong_ratio": -0.1, "weak_ratio": 0.5, "spans": ((1, 1),)}, "strong_ratio=-0.1"),
        ({"strong_ratio": 0.0, "weak_ratio": 0.5, "spans": ()}, "span"),
        ({"strong_ratio": 0.0, "weak_ratio": 0.5, "spans": ((2, 1),)}, "start 2 > end 1"),
    ],
)
def test_sparse_guidance_spec_refuses_bad_values(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        SparseGuidance(**kwargs)


# --------------------------------------------------------------------------------------------
# Branches on a real routed model


class RecordingModel(torch.nn.Module):
    """Passes calls to a backbone and records the routes and plan shapes of each."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_tokens, self.keep_order, self.blocks = inner.num_tokens, False, inner.blocks
        self.calls: list[tuple[list[Route] | None, list[tuple[int, ...]] | None, int]] = []

    def forward(self, x, t, y, *, routes=None, plans=None, generator=None):
        shapes = None if plans is None else [tuple(p.keep.shape) for p in plans]
        self.calls.append((None if routes is None else list(routes), shapes, x.shape[0]))
        return self.inner(x, t, y, routes=routes, plans=plans, generator=generator)


@pytest.mark.parametrize("strong", [0.0, 0.25])
def test_branches_run_the_model_with_explicit_routes(strong) -> None:
    model, config = tiny_run()
    recorder = RecordingModel(model)
    sparse = SparseGuidance(strong, 0.5, ((1, 1),))
    noise = PerSampleRNG(range(3)).randn((1, 8, 8))
    sample(
        objective_from_config(config),
        recorder,
        noise,
        torch.tensor([1, 2, 3]),
        sampler="edm_heun",
        steps=1,  # one evaluation of each branch
        guidance=2.0,
        guidance_mode="sg",
        sparse=sparse,
        route_rng=PerSampleRNG(range(3)),
    )
    strong_call, weak_call = recorder.calls
    if strong == 0:
        assert strong_call == ([], None, 3)  # dense: routes=[] and nothing drawn
    else:
        assert strong_call == ([Route(1, 1, 0.25)], [(3, 12)], 3)  # 16 - floor(4) kept
    assert weak_call == ([Route(1, 1, 0.5)], [(3, 8)], 3)


@pytest.mark.parametrize(
    "overrides, learn_sigma",
    [([], False), ([], True), (FLOW, False)],
    ids=["edm", "edm-learn_sigma", "flow"],
)
@pytest.mark.parametrize("mode", ["sg", "cfg+sg"])
def test_guided_prediction_combines_the_objectives_predictions(overrides, learn_sigma, mode):
    """One solver step of each objective returns the guided prediction itself (EDM: D(x, 80) at
    sigma_max; flow: noise - v(noise, 1)), so it can be rebuilt from the two branches by hand."""
    model, config = tiny_run(*overrides, f"model.learn_sigma={learn_sigma}")
    objective = objective_from_config(config)
    seeds, omega = [5, 6, 7], 1.5
    noise = PerSampleRNG(seeds).randn((1, 8, 8), dtype=torch.float64).float()
    y = torch.tensor([1, 2, 3])
    sparse = SparseGuidance(0.0, 0.5, ((1, 1),))
    out = sample(
        objective,
        model,
        noise,
        y,
        sampler=config.sample.sampler,
        steps=1,
        guidance=omega,
        null_label=NULL,
        guidance_mode=mode,
        sparse=sparse,
        route_rng=PerSampleRNG(seeds),
    )
    weak_routes = sparse.routes(0.5)
    plans = draw_plans(weak_routes, 16, torch.arange(3), PerSampleRNG(seeds), device=noise.device)
    weak_y = y if mode == "sg" else torch.full_like(y, NULL)
    strong_fn = objective.prediction(lambda x, t, c: model(x, t, c, routes=[]))
    weak_fn = objective.prediction(lambda x, t, c: model(x, t, c, routes=weak_routes, plans=plans))
    with torch.no_grad():
        if config.objective.name == "edm":
            x, time = noise * 80.0, torch.full((3,), 80.0)
            expected = omega * strong_fn(x, time, y) + (1 - omega) * weak_fn(x, time, weak_y)
        else:
            time = torch.ones(3)
            v = omega * strong_fn(noise, time, y) + (1 - omega) * weak_fn(noise, time, weak_y)
            expected = noise - v
    # float32 rounding of the two equivalent forms of the mix; a wrong plan is off by ~0.1.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", get_args(GuidanceMode))
def test_sample_i_is_the_same_at_any_batch_size(mode) -> None:
    """Samples 0..5 drawn in batches of 6, 2 and 4 are identical: noise and the sparse
    branches' kept tokens come from each sample's own generators."""
    model, config = tiny_run()
    config = with_guidance(config, guidance_mode=mode, guidance=2.0)
    labels, seeds = [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]

    def run(batch_size: int) -> Tensor:
        batches = generate(model, config, labels, seeds, batch_size=batch_size)
        return torch.cat([x for x, _ in batches])

    full = run(6)
    for batch_size in (2, 4):
        # CPU kernels for the routed (K-token) blocks may round differently at another batch
        # size (measured: <= 3e-5); a different kept-token draw moves pixels by ~0.1 or more.
        torch.testing.assert_close(run(batch_size), full, rtol=0, atol=1e-4)
    # Guidance does something, and the routing draw matters: other route seeds, other samples.
    plain = torch.cat([x for x, _ in generate(model, config, labels, seeds, guidance=1.0)])
    assert not torch.allclose(plain, full)


def test_routing_draws_differ_per_sample_and_follow_the_sample_seed() -> None:
    routes = [Route(1, 1, 0.5)]
    a = draw_plans(routes, 16, torch.arange(4), PerSampleRNG([1, 2, 3, 4]), device="cpu")
    b = draw_plans(routes, 16, torch.tensor([2]), PerSampleRNG([9, 9, 3]), device="cpu")
    assert a[0].keep.shape == (4, 8)
    assert torch.equal(a[0].keep[2:3], b[0].keep)  # row 2 of each: seed 3's first draw
    assert len({tuple(row) for row in a[0].keep.tolist()}) == 4  # samples differ


def test_cfg_samples_are_unchanged_by_the_meter_and_sg_omega_one_is_dense() -> None:
    model, config = tiny_run()
    labels, seeds = [0, 1, 2], [3, 4, 5]
    guided = with_guidance(config, guidance=3.0)
    with_meter = generate(model, guided, labels, seeds, meter=cost_meter(model))
    without = generate(model, guided, labels, seeds)
    assert torch.equal(next(with_meter)[0], next(without)[0])
    # omega = 1 with a dense strong branch is the unguided dense model, bit for bit.
    dense = next(generate(model, config, labels, seeds))[0]
    sg_one = with_guidance(config, guidance_mode="sg", guidance=1.0)
    assert torch.equal(next(generate(model, sg_one, labels, seeds))[0], dense)


# --------------------------------------------------------------------------------------------
# Cost accounting


def _cost(model, config, **kwargs) -> dict:
    meter = cost_meter(model)
    list(generate(model, config, [1, 2, 3, 4], [0, 1, 2, 3], meter=meter, **kwargs))
    return meter.per_image()


def test_nfe_of_cfg_is_twice_unguided_and_sg_flops_are_dense_plus_routed() -> None:
    model, config = tiny_run()  # edm_heun, 3 steps: 2 * 3 - 1 = 5 evaluations
    evaluations = 5
    dense, routed = forward_flops(model), forward_flops(model, [Route(1, 1, 0.5)])
    assert routed < dense
    unguided = _cost(model, config)
    assert unguided == {"nfe_per_image": evaluations, "flops_per_image": evaluations * dense}
    cfg = _cost(model, with_guidance(config, guidance=2.0))
    assert cfg == {"nfe_per_image": 2 * evaluations, "flops_per_image": 2 * evaluations * dense}
    sg = _cost(model, with_guidance(config, guidance_mode="sg", guidance=2.0))
    assert sg["nfe_per_image"] == 2 * evaluations
    assert sg["flops_per_image"] == (dense + routed) * evaluations
    assert sg["flops_per_image"] < cfg["flops_per_image"]
    # omega = 1 costs the strong branch alone.
    one = _cost(model, with_guidance(config, guidance_mode="cfg+sg", guidance=1.0))
    assert one == unguided


@pytest.mark.parametrize("mode", get_args(GuidanceMode))
def test_the_interval_counts_exactly_the_calls_made(mode) -> None:
    # flow_euler with 4 steps evaluates at t = 1, 0.75, 0.5, 0.25; [0.3, 0.8] holds two.
    model, config = tiny_run(*FLOW, "sample.steps=4")
    guided = with_guidance(config, guidance_mode=mode, guidance=2.0, guidance_interval=[0.3, 0.8])
    cost = _cost(model, guided)
    dense = forward_flops(model)
    second = dense if mode == "cfg" else forward_flops(model, [Route(1, 1, 0.5)])
    assert cost == {"nfe_per_image": 4 + 2, "flops_per_image": 4 * dense + 2 * second}


def test_meter_counts_nfe_without_a_price_for_other_networks() -> None:
    meter = CostMeter()
    noise = torch.zeros(3, 2)
    sample(
        objective_from_config(tiny_run(*FLOW)[1]),
        lambda x, t, y: -x,
        noise,
        torch.zeros(3, dtype=torch.long),
        sampler="flow_heun",
        steps=2,
        meter=meter,
    )
    assert meter.per_image() == {"nfe_per_image": 4, "flops_per_image": None}


# --------------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["sample.guidance_mode=sgg"], "sample.guidance_mode='sgg' is not one of cfg, sg, cfg+sg"),
        (["sample.sg_strong_ratio=1.0"], "sample.sg_strong_ratio=1.0 (--sg-strong)"),
        (["sample.sg_weak_ratio=-0.5"], "sample.sg_weak_ratio=-0.5 (--sg-weak) must be in [0, 1)"),
        (["sample.sg_strong_ratio=0.6", "sample.sg_weak_ratio=0.4"], "must be below"),
        (["sample.guidance_mode=sg", "sample.sg_strong_ratio=0.5"], "below the weak ratio 0.5"),
        (["sample.sg_route=[1]"], "sample.sg_route=[1] (--sg-route) needs [start, end]"),
        (["sample.sg_route=[2, 1]"], "start 2 comes after end 1"),
        (["sample.guidance_mode=sg", "sample.sg_route=[1, 3]"], "outside the model's 3 blocks"),
        (["sample.guidance_mode=cfg+sg", "model.routes=[]"], "set sample.sg_route"),
        (
            ["sample.guidance_mode=sg", "model.routes=[]", "sample.sg_route=[1, 1]"],
            "set sample.sg_weak_ratio (--sg-weak)",
        ),
        (["sample.guidance_interval=[0.5]"], "sample.guidance_interval=[0.5]"),
    ],
)
def test_config_refuses_bad_guidance_in_one_line(overrides, needle) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("digits_tread", [*SHAPE, *overrides])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_defaults_come_from_the_training_route() -> None:
    _, config = tiny_run("sample.guidance_mode=sg")
    assert config.sparse_guidance() == SparseGuidance(0.0, 0.5, ((1, 1),))
    dense_twin = load_config(
        "digits_tread",
        [*SHAPE, "model.routes=[]", "sample.guidance_mode=cfg+sg", "sample.sg_route=[0, -1]"]
        + ["sample.sg_weak_ratio=0.75", "sample.sg_strong_ratio=0.25"],
    )
    assert dense_twin.sparse_guidance() == SparseGuidance(0.25, 0.75, ((0, 2),))  # resolved
    assert dataclasses.replace(config.sample, guidance_mode="cfg").sparse_guidance([], 3) is None
