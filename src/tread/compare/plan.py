"""Planning a comparison: the two arms, the evaluation and log intervals from the budget."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..config import Config
from ..errors import ConfigError

ARMS = ("dense", "tread")
MIN_EVAL_POINTS = 5  # evaluations per arm below which no conclusion is drawn
MIN_STEPS = 200  # training steps per arm below which no conclusion is drawn
MIN_RATE_ROWS = 3  # logged training rows (after the first, which holds warm-up) for a median
EVAL_POINTS = 5  # evaluations along a run when the interval is chosen from the budget
LOG_ROWS = 20  # logged training rows along a run when the budget is short
PROBE_MARGIN = 0.8  # the probe leaves out data loading, EMA and logging: the loop is slower
SEED_STRIDE = 1000  # noise seeds 0, 1000, 2000, ... (rounded up past eval.num_samples)


def arm_configs(
    config: Config,
    out: Path,
    *,
    minutes: float | None,
    eval_every: int | None,
    eval_samples: int | None,
    log_every: int | None = None,
) -> dict[str, Config]:
    """The two arms: identical but for routes and run directory.

    Args:
        config: the routed config (its routes are the TREAD arm's).
        out: the comparison's output directory; the arms train in ``out/dense``, ``out/tread``.
        minutes: equal training wall-clock per arm; None = ``config.train.steps`` steps each.
        eval_every: steps between evaluations; None = the config's (250 if it has none).
        eval_samples: samples per evaluation; None = ``config.eval.num_samples``.
        log_every: steps between logged training rows; None = the config's.
    """
    if not config.model.routes:
        raise ConfigError("compare needs a config with model.routes (the TREAD arm)")
    if minutes is not None:
        # Equal wall-clock: the step count is only a cap, far beyond what the budget allows.
        train = dataclasses.replace(config.train, steps=10**7, max_minutes=minutes)
    else:
        train = dataclasses.replace(config.train, max_minutes=None)
    if log_every is not None:
        train = dataclasses.replace(train, log_every=log_every)
    evaluation = dataclasses.replace(
        config.eval,
        every=eval_every if eval_every is not None else (config.eval.every or 250),
        num_samples=eval_samples or config.eval.num_samples,
    )
    arms = {}
    for name in ARMS:
        model = config.model if name == "tread" else dataclasses.replace(config.model, routes=[])
        arms[name] = dataclasses.replace(
            config,
            model=model,
            train=dataclasses.replace(train, run_dir=str(out / name)),
            eval=evaluation,
        )
    return arms


def choose_eval_every(expected_steps: int, points: int = EVAL_POINTS) -> int:
    """Steps between evaluations so that a run of ``expected_steps`` gets ``points`` of them."""
    return max(1, expected_steps // points)


def choose_log_every(log_every: int, expected_steps: int) -> int:
    """The config's log interval, shortened so that a short run still logs about LOG_ROWS rows
    (the median it/s needs several)."""
    return max(1, min(log_every, expected_steps // LOG_ROWS))


def expected_steps(rates: dict[str, float], minutes: float) -> int:
    """Steps the slower arm should reach in ``minutes`` of training at the probed ``rates``."""
    return int(min(rates.values()) * 60 * minutes * PROBE_MARGIN)


@dataclasses.dataclass
class Intervals:
    """Evaluation and logging intervals for a budget, and how they were chosen."""

    eval_every: int
    log_every: int
    expected_steps: int  # of the slower arm
    note: str  # how eval_every was chosen (goes into the report)
    rates: dict[str, float] | None = None  # probed it/s per arm (wall-clock budget only)


def plan_intervals(
    resolved: dict[str, Config],
    *,
    minutes: float | None,
    eval_every: int | None,
    device: torch.device | str = "cpu",
) -> Intervals:
    """Intervals for the budget: ``train.steps`` steps, or ``minutes`` at a probed step rate.

    Args:
        resolved: each arm's resolved config (shapes filled), as :func:`arm_configs` makes them.
        minutes: equal training wall-clock per arm; None = ``train.steps`` steps.
        eval_every: an explicit interval (``--eval-every``); None = chosen from the budget.
        device: where the probe runs (where training will).
    """
    rates = None
    if minutes is None:
        expected = resolved["tread"].train.steps
    else:
        rates = {name: probe_step_rate(c, device=device) for name, c in resolved.items()}
        expected = expected_steps(rates, minutes)
    if eval_every is not None:
        note = "--eval-every"
    else:
        eval_every = choose_eval_every(expected)
        note = f"chosen for {EVAL_POINTS} evaluations over about {expected} steps"
    log_every = choose_log_every(resolved["tread"].train.log_every, expected)
    return Intervals(eval_every, log_every, expected, note, rates)


def probe_step_rate(config: Config, *, steps: int = 3, device: torch.device | str = "cpu") -> float:
    """Training steps per second of a resolved config's model, from a few steps on random data.

    Nothing is written: the model, optimizer and batch are thrown away. One untimed step first
    (allocator, caches).
    """
    from ..train.builders import build_from_config, objective_from_config

    device = torch.device(device)
    model = build_from_config(config).to(device).train()
    objective = objective_from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    generator = torch.Generator(device=device).manual_seed(0)
    m = config.model
    shape = (config.train.batch_size, m.in_channels, m.input_size, m.input_size)
    x0 = torch.randn(shape, generator=generator, device=device)
    y = torch.randint(0, m.num_classes, (shape[0],), generator=generator, device=device)
    bf16 = device.type == "cuda" and config.train.precision in ("auto", "bf16")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective.loss(model, x0, y, generator).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / max(time.perf_counter() - start, 1e-9)
