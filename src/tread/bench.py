"""Side-by-side training-step benchmark: dense vs routed, interleaved, medians of repeats.

A step is forward + MSE loss + backward + AdamW on random data at the model's input size. The
two arms are separate copies of the same initial weights, each with its own optimizer, timed in
alternating order within every repeat so that machine noise hits both alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .cost import forward_flops
from .models import build_model
from .routing import Route


@dataclass
class ArmResult:
    """Measurements of one arm (dense or routed)."""

    step_seconds: list[float]  # median seconds per step, one entry per repeat
    images_per_second: float  # batch / median step time
    peak_memory_mb: float | None  # CUDA peak allocated; None on CPU
    forward_gflops: float  # analytic, per sample


@dataclass
class BenchResult:
    """One benchmark row: a model at one input size and batch, dense vs routed."""

    model: str
    input_size: int
    tokens: int
    batch: int
    routes: list[dict]
    device: str
    precision: str
    compiled: bool
    dense: ArmResult
    routed: ArmResult
    speedup: float  # routed images/s over dense images/s
    ideal_speedup: float  # dense / routed analytic FLOPs
    fraction_of_ideal: float = field(init=False)

    def __post_init__(self) -> None:
        self.fraction_of_ideal = self.speedup / self.ideal_speedup

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    model: nn.Module,
    routes: Sequence[Route],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    precision: str,
    seed: int,
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x, t, y, target = batch
    device = x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, y, routes=routes, generator=generator)
            loss = (out.float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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
        BenchResult with median images/s per arm, the speed-up and its fraction of the ideal.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    dense_model = build_model(
        model_name, input_size=input_size, in_channels=in_channels, num_classes=num_classes
    ).to(device)
    routed_model = copy.deepcopy(dense_model)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, in_channels, input_size, input_size)
    data = (
        torch.randn(shape, generator=generator, device=device),
        torch.rand(batch, generator=generator, device=device),
        torch.randint(0, num_classes + 1, (batch,), generator=generator, device=device),
        torch.randn(shape, generator=generator, device=device),
    )
    arms = {}
    for name, model, arm_routes in (
        ("dense", dense_model, ()),
        ("routed", routed_model, tuple(routes)),
    ):
        model.train()
        runner = torch.compile(model) if compile else model
        arms[name] = _make_step(runner, arm_routes, data, precision, seed)

    for step in arms.values():
        for _ in range(warmup):
            step()
    _synchronize(device)

    times: dict[str, list[float]] = {"dense": [], "routed": []}
    peaks: dict[str, float | None] = {"dense": None, "routed": None}
    order = ["dense", "routed"]
    for _ in range(repeats):
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_step = []
            for _ in range(steps_per_repeat):
                _synchronize(device)
                start = time.perf_counter()
                arms[name]()
                _synchronize(device)
                per_step.append(time.perf_counter() - start)
            times[name].append(statistics.median(per_step))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
        order.reverse()  # alternate which arm runs first

    config = dense_model.config
    results = {}
    for name, arm_routes in (("dense", ()), ("routed", tuple(routes))):
        median = statistics.median(times[name])
        results[name] = ArmResult(
            step_seconds=times[name],
            images_per_second=batch / median,
            peak_memory_mb=peaks[name],
            forward_gflops=forward_flops(config, arm_routes) / 1e9,
        )
    return BenchResult(
        model=model_name,
        input_size=input_size,
        tokens=config.num_tokens,
        batch=batch,
        routes=[{"start": r.start, "end": r.end, "ratio": r.ratio} for r in routes],
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        precision=precision,
        compiled=compile,
        dense=results["dense"],
        routed=results["routed"],
        speedup=results["routed"].images_per_second / results["dense"].images_per_second,
        ideal_speedup=results["dense"].forward_gflops / results["routed"].forward_gflops,
    )


def format_table(rows: Sequence[BenchResult]) -> str:
    """A plain-text table of benchmark rows for the terminal (model column as wide as needed)."""
    width = max([10, *(len(r.model) for r in rows)])
    header = (
        f"{'model':<{width}} {'tok':>4} {'batch':>5} {'prec':>5} {'dense img/s':>11} "
        f"{'routed img/s':>12} {'speed-up':>8} {'ideal':>6} {'of ideal':>8} {'mem MB d/r':>13}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = (
            f"{r.dense.peak_memory_mb:.0f}/{r.routed.peak_memory_mb:.0f}"
            if r.dense.peak_memory_mb is not None and r.routed.peak_memory_mb is not None
            else "n/a"
        )
        lines.append(
            f"{r.model:<{width}} {r.tokens:>4} {r.batch:>5} {r.precision:>5} "
            f"{r.dense.images_per_second:>11.2f} {r.routed.images_per_second:>12.2f} "
            f"{r.speedup:>7.3f}x {r.ideal_speedup:>5.3f}x {100 * r.fraction_of_ideal:>7.1f}% "
            f"{memory:>13}"
        )
    return "\n".join(lines)
