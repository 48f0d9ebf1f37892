"""Side-by-side training-step benchmark: dense vs routed, interleaved, medians of repeats.

A step is forward + MSE loss + backward + AdamW on random data at the model's input size. The
two arms are separate copies of the same initial weights, each with its own optimizer, timed in
alternating order within every repeat so that machine noise hits both alike.

One timing loop (:func:`time_arms`) serves every kind of model: it takes a *step factory*, a
function that returns one arm's training step. :func:`benchmark_step` builds the factory for
tread's registry models (ideal speed-up from the analytic cost model),
:func:`benchmark_diffusers` for diffusers transformers routed by
:func:`tread.integrations.diffusers.enable_routing` (ideal speed-up counted by
``torch.utils.flop_counter``: tread's cost model does not know diffusers blocks).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .cost import forward_flops
from .models import build_model
from .routing import Route

#: The two arms, in the order the first repeat runs them.
ARMS = ("dense", "routed")

#: Returns the training step of one arm ("dense" or "routed"): a call runs one full step.
StepFactory = Callable[[str], Callable[[], None]]


@dataclass
class ArmResult:
    """Measurements of one arm (dense or routed)."""

    step_seconds: list[float]  # median seconds per step, one entry per repeat
    images_per_second: float  # batch / median step time
    peak_memory_mb: float | None  # CUDA peak allocated; None on CPU
    forward_gflops: float  # per sample; analytic or counted (see BenchResult.flops_source)


@dataclass
class BenchResult:
    """One benchmark row: a model at one input size and batch, dense vs routed."""

    model: str
    input_size: int
    tokens: int  # image tokens (the ones routes may skip)
    batch: int
    routes: list[dict]
    device: str
    precision: str
    compiled: bool
    dense: ArmResult
    routed: ArmResult
    speedup: float  # routed images/s over dense images/s
    ideal_speedup: float  # dense / routed forward FLOPs
    # "analytic": tread's cost model; "counted": torch.utils.flop_counter over one training-mode
    # forward of each arm (routing on, grad on), text tokens that always pass included.
    flops_source: str = "analytic"
    text_tokens: int = 0  # tokens that run every block (Flux's text); 0 for class-conditional
    fraction_of_ideal: float = field(init=False)

    def __post_init__(self) -> None:
        self.fraction_of_ideal = self.speedup / self.ideal_speedup

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArmTiming:
    """Raw timings of one arm from :func:`time_arms`."""

    step_seconds: list[float]  # median seconds per step, one entry per repeat
    peak_memory_mb: float | None  # CUDA peak allocated over the repeats; None on CPU


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def _device_name(device: torch.device) -> str:
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def training_step(
    forward: Callable[[], Tensor],
    parameters: Iterable[nn.Parameter],
    target: Tensor,
    *,
    precision: str,
    device: torch.device,
) -> Callable[[], None]:
    """One arm's training step: forward, MSE against ``target``, backward, AdamW.

    Args:
        forward: runs the model on the arm's fixed inputs and returns its output, shaped like
            ``target``.
        parameters: what the optimizer updates.
        target: the regression target.
        precision: "fp32", or "bf16" (autocast around forward and loss).
        device: where the model runs (its autocast device type).

    Returns:
        A function that runs one step.
    """
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)
    autocast = precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = (forward().float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_arms(
    make_step: StepFactory,
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    steps_per_repeat: int = 2,
) -> dict[str, ArmTiming]:
    """Time the dense and routed training steps of ``make_step`` side by side.

    Each arm first runs ``warmup`` untimed steps; then every repeat times ``steps_per_repeat``
    steps of each arm (keeping their median), alternating which arm goes first.

    Args:
        make_step: the step factory, called once per arm of :data:`ARMS`.
        device: where the steps run (CUDA is synchronised around every timed step).
        warmup: untimed steps per arm first (compilation, allocator, caches).
        repeats: timed rounds.
        steps_per_repeat: steps per arm per round.

    Returns:
        Arm name -> its :class:`ArmTiming`.
    """
    steps = {name: make_step(name) for name in ARMS}
    for step in steps.values():
        for _ in range(warmup):
            step()
    _synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in ARMS}
    peaks: dict[str, float | None] = dict.fromkeys(ARMS)
    order = list(ARMS)
    for _ in range(repeats):
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_step = []
            for _ in range(steps_per_repeat):
                _synchronize(device)
                start = time.perf_counter()
                steps[name]()
                _synchronize(device)
                per_step.append(time.perf_counter() - start)
            times[name].append(statistics.median(per_step))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
        order.reverse()  # alternate which arm runs first
    return {name: ArmTiming(times[name], peaks[name]) for name in ARMS}


def _result(
    timings: dict[str, ArmTiming], gflops: dict[str, float], batch: int, **row: Any
) -> BenchResult:
    """A :class:`BenchResult` from both arms' timings and per-sample forward GFLOPs."""
    arms = {
        name: ArmResult(
            step_seconds=timings[name].step_seconds,
            images_per_second=batch / statistics.median(timings[name].step_seconds),
            peak_memory_mb=timings[name].peak_memory_mb,
            forward_gflops=gflops[name],
        )
        for name in ARMS
    }
    return BenchResult(
        batch=batch,
        dense=arms["dense"],
        routed=arms["routed"],
        speedup=arms["routed"].images_per_second / arms["dense"].images_per_second,
        ideal_speedup=gflops["dense"] / gflops["routed"],
        **row,
    )


def _route_dicts(routes: Sequence[Route]) -> list[dict]:
    return [{"start": r.start, "end": r.end, "ratio": r.ratio} for r in routes]


def benchmark_step(
    model_name: str,
    routes: Sequence[Route],
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    batch: int = 32,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    steps_per_repeat: int = 2,
    seed: int = 0,
) -> BenchResult:
    """Time full training steps of ``model_name`` dense and with ``routes``, side by side.

    Args:
        model_name: registry name, e.g. ``"DiT-S/2"``.
        routes: the routed arm's routes (the dense arm uses none).
        input_size, in_channels, num_classes: model input; 32x32x4 = ImageNet-256 latents.
        batch: per-step batch size.
        device: where to run.
        precision: "fp32" or "bf16" (autocast).
        compile: wrap each arm in ``torch.compile``.
        warmup: untimed steps per arm first (compilation, allocator, caches).
        repeats: timed rounds; each round times both arms, alternating which goes first.
        steps_per_repeat: steps per arm per round; the round's figure is their median.
        seed: weights, data and routing seed.

    Returns:
        BenchResult with median images/s per arm, the speed-up and its fraction of the ideal
        (the ideal from tread's analytic cost model).
    """
    _check_precision(precision)
    device = torch.device(device)
    torch.manual_seed(seed)
    dense_model = build_model(
        model_name, input_size=input_size, in_channels=in_channels, num_classes=num_classes
    ).to(device)
    models = {"dense": dense_model, "routed": copy.deepcopy(dense_model)}
    arm_routes = {"dense": (), "routed": tuple(routes)}
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, in_channels, input_size, input_size)
    x = torch.randn(shape, generator=generator, device=device)
    t = torch.rand(batch, generator=generator, device=device)
    y = torch.randint(0, num_classes + 1, (batch,), generator=generator, device=device)
    target = torch.randn(shape, generator=generator, device=device)

    def make_step(arm: str) -> Callable[[], None]:
        model = models[arm].train()
        runner = torch.compile(model) if compile else model
        route_gen = torch.Generator(device=device).manual_seed(seed)

        def forward() -> Tensor:
            return runner(x, t, y, routes=arm_routes[arm], generator=route_gen)

        return training_step(
            forward, model.parameters(), target, precision=precision, device=device
        )

    timings = time_arms(
        make_step,
        device=device,
        warmup=warmup,
        repeats=repeats,
        steps_per_repeat=steps_per_repeat,
    )
    config = dense_model.config
    return _result(
        timings,
        {arm: forward_flops(config, arm_routes[arm]) / 1e9 for arm in ARMS},
        batch,
        model=model_name,
        input_size=input_size,
        tokens=config.num_tokens,
        routes=_route_dicts(routes),
        device=_device_name(device),
        precision=precision,
        compiled=compile,
    )


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention: Q K^T and (softmax) V, 2 per multiply-add."""
    batch, heads, queries, head_dim = query_shape  # (B, h, N_q, d)
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def _attention_mapping() -> dict[Any, Callable[..., int]]:
    """Attention kernels that ``FlopCounterMode`` does not price itself: the CPU kernel of
    ``scaled_dot_product_attention`` (without it, attention would count as free on CPU)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu",)
    ops = [getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name)]
    return dict.fromkeys(ops, _sdpa_flops)


def counted_forward_flops(forward: Callable[[], Any]) -> int:
    """FLOPs of one call of ``forward``, counted op by op with ``torch.utils.flop_counter``.

    Matrix products, convolutions and attention (every ``scaled_dot_product_attention``
    kernel, the CPU one included) are counted; element-wise work, gathers and scatters are
    not, so the ratio of two counts is the ideal speed-up of the matmul-bound work. The call
    runs for real, with grad as the caller has it (its autograd graph is dropped).

    Args:
        forward: runs the model once.

    Returns:
        Total FLOPs of the call.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    with counter:
        forward()
    return counter.get_total_flops()


def benchmark_diffusers(
    config_name: str,
    routes: Sequence[Route],
    *,
    batch: int = 32,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    steps_per_repeat: int = 2,
    seed: int = 0,
) -> BenchResult:
    """Time training steps of a diffusers transformer plain and routed, side by side.

    The model is built from the constructor at a registered size
    (:data:`tread.integrations.diffusers_configs.DIFFUSERS_CONFIGS`); the routed arm is a
    copy of the same weights with :func:`~tread.integrations.diffusers.enable_routing` on.
    Inputs are the model's real ones (latents, timesteps, labels or text embeddings and
    position ids), the loss is MSE against a random target. The ideal speed-up is counted,
    not modelled: dense / routed FLOPs of one training-mode forward of each arm under
    :func:`counted_forward_flops` (routing on, grad on); tokens that always pass (Flux's text)
    are in both counts, so a text-conditioned model's ideal is below a DiT's with the same
    route.

    Args:
        config_name: a key of ``DIFFUSERS_CONFIGS``, e.g. ``"dit-s"`` or ``"flux-s"``.
        routes: the routed arm's routes; indices count across the model's block lists.
        batch, device, precision, compile, warmup, repeats, steps_per_repeat, seed: as in
            :func:`benchmark_step`.

    Returns:
        BenchResult with ``flops_source="counted"``; ``tokens`` counts the image tokens and
        ``text_tokens`` the ones that always pass.

    Raises:
        ConfigError: an unknown config name (the message lists the known ones) or no diffusers.
    """
    from .integrations.diffusers import enable_routing
    from .integrations.diffusers_configs import (
        build_diffusers_model,
        diffusers_config,
        training_inputs,
    )

    _check_precision(precision)
    config = diffusers_config(config_name)
    device = torch.device(device)
    torch.manual_seed(seed)  # the weights (and DiT's label dropout) draw from the global RNG
    dense_model = build_diffusers_model(config).to(device)
    routed_model = copy.deepcopy(dense_model)
    route_gen = torch.Generator(device=device).manual_seed(seed)
    handle = enable_routing(routed_model, routes, generator=route_gen)
    models = {"dense": dense_model, "routed": routed_model}
    data_gen = torch.Generator(device=device).manual_seed(seed)
    inputs, target = training_inputs(config, batch, generator=data_gen, device=device)
    try:
        # Both models are in train mode and grad is on: the routed forward routes.
        counted = {
            arm: counted_forward_flops(lambda m=models[arm]: m(**inputs).sample) for arm in ARMS
        }

        def make_step(arm: str) -> Callable[[], None]:
            model = models[arm]
            runner = torch.compile(model) if compile else model
            return training_step(
                lambda: runner(**inputs).sample,
                model.parameters(),
                target,
                precision=precision,
                device=device,
            )

        timings = time_arms(
            make_step,
            device=device,
            warmup=warmup,
            repeats=repeats,
            steps_per_repeat=steps_per_repeat,
        )
        resolved = list(handle.routes)
    finally:
        handle.remove()
    return _result(
        timings,
        {arm: counted[arm] / batch / 1e9 for arm in ARMS},
        batch,
        model=config_name,
        input_size=config.latent_size,
        tokens=config.image_tokens,
        routes=_route_dicts(resolved),
        device=_device_name(device),
        precision=precision,
        compiled=compile,
        flops_source="counted",
        text_tokens=config.text_tokens,
    )


def _tokens(row: BenchResult) -> str:
    return f"{row.tokens}+{row.text_tokens}" if row.text_tokens else str(row.tokens)


def format_table(rows: Sequence[BenchResult]) -> str:
    """A plain-text table of benchmark rows for the terminal (model column as wide as needed).

    Token counts read ``image+text`` where some tokens always pass; a note under the table
    says where each ideal comes from when any row's was counted.
    """
    width = max([10, *(len(r.model) for r in rows)])
    tok = max([4, *(len(_tokens(r)) for r in rows)])
    header = (
        f"{'model':<{width}} {'tok':>{tok}} {'batch':>5} {'prec':>5} {'dense img/s':>11} "
        f"{'routed img/s':>12} {'speed-up':>8} {'ideal':>6} {'of ideal':>8} {'mem MB d/r':>13}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = (
            f"{r.dense.peak_memory_mb:.0f}/{r.routed.peak_memory_mb:.0f}"
            if r.dense.peak_memory_mb is not None and r.routed.peak_memory_mb is not None
            else "n/a"
        )
        mark = "*" if r.flops_source == "counted" else " "
        lines.append(
            f"{r.model:<{width}} {_tokens(r):>{tok}} {r.batch:>5} {r.precision:>5} "
            f"{r.dense.images_per_second:>11.2f} {r.routed.images_per_second:>12.2f} "
            f"{r.speedup:>7.3f}x {r.ideal_speedup:>5.3f}x{mark}{100 * r.fraction_of_ideal:>7.1f}% "
            f"{memory:>13}"
        )
    if any(r.flops_source == "counted" for r in rows):
        lines.append(
            "* ideal counted: dense / routed FLOPs of one training-mode forward "
            "(torch.utils.flop_counter), tokens that always pass (text) included; "
            "other ideals: tread's cost model"
        )
    return "\n".join(lines)
