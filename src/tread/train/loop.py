"""The training loop: one function, any backbone, any objective, one or many processes.

Randomness: every per-step draw (label dropout, noise level, noise, token subsets) comes from a
generator seeded by (seed, step), drawn for the *global* batch and sliced per rank. So a run
resumed from a checkpoint continues exactly as an uninterrupted one, and N ranks with per-rank
batch b compute the same update as one process with batch N*b.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, TrainConfig, config_to_yaml
from ..data import BatchStream
from ..errors import CheckpointError, ConfigError, TreadError
from ..routing import RoutePlan, sample_plan
from ..seeding import derive_seed
from . import checkpoint as ckpt
from .builders import build_from_config, load_data, objective_from_config, with_data_shape
from .dist import DistInfo, all_true, barrier, init_process_group, mean_across
from .ema import ema_decay, make_ema, update_ema
from .metrics_log import MetricsLog

log = logging.getLogger(__name__)

EvalHook = Callable[[int, nn.Module, Config], dict[str, float]]


class _Clock:
    """Wall-clock of a run across resumes, split into training and side work.

    Side work (evaluation, sample grids, checkpoints) is excluded from ``train_seconds`` so that
    time budgets and dense-vs-routed comparisons measure training alone.
    """

    def __init__(self, elapsed: float = 0.0, side: float = 0.0) -> None:
        self.start = time.perf_counter()
        self.before = elapsed
        self.side = side

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return self.elapsed() - self.side

    @contextmanager
    def side_work(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.side += time.perf_counter() - begin


def _projected_steps(step: int, rate: float, train_seconds: float, tc: TrainConfig) -> int:
    """Steps the run will reach: ``tc.steps``, or fewer when the time budget runs out first.

    Used as the progress bar's total so that its ETA is right for time-budgeted runs.
    """
    if tc.max_minutes is None:
        return tc.steps
    left = max(60 * tc.max_minutes - train_seconds, 0.0)
    return min(tc.steps, step + math.ceil(rate * left))


class NonFiniteLossError(TreadError):
    """Training stopped because the loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped: str  # "steps" | "time"
    config: Config


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _step_draws(
    config: Config,
    objective: Any,
    model: nn.Module,
    step: int,
    global_batch: int,
    rows: slice,
    shape: tuple[int, ...],
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, list[RoutePlan]]:
    """All randomness of one step for the global batch, sliced to this rank's rows."""
    g = torch.Generator(device=device).manual_seed(derive_seed(config.train.seed, "step", step))
    drop = torch.rand(global_batch, generator=g, device=device) < config.train.class_dropout
    like = torch.empty(global_batch, device=device)
    time_ = objective.sample_time(global_batch, like=like, generator=g)  # (B,)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)  # (B, C, H, W)
    plans = []
    N = model.num_tokens
    for route in model.routes:
        full = sample_plan(
            global_batch,
            N,
            route.num_kept(N),
            generator=g,
            device=device,
            keep_order=model.keep_order,
        )
        plans.append(RoutePlan(full.keep[rows]))  # (B, K) -> (b, K)
    return drop[rows], time_[rows], noise[rows], plans


def _prepare_run_dir(config: Config, info: DistInfo) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None = fresh start)."""
    run_dir = Path(config.train.run_dir)
    existing = ckpt.list_checkpoints(run_dir)
    resume = config.train.resume
    if resume == "auto":
        return run_dir, existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise ConfigError(
                f"train.run_dir={run_dir} already holds checkpoints; resume with "
                "train.resume=auto or choose a new train.run_dir (nothing was overwritten)"
            )
        return run_dir, None
    return run_dir, ckpt.resolve_checkpoint(resume)


def _check_compatible(saved: Config, current: Config, source: Path) -> None:
    for section in ("model", "objective", "data"):
        a, b = getattr(saved, section), getattr(current, section)
        if a != b:
            diff = [k for k in vars(a) if getattr(a, k) != getattr(b, k)]
            raise CheckpointError(
                f"checkpoint {source} was trained with a different {section} config "
                f"({', '.join(f'{section}.{k}' for k in diff)}); use a new train.run_dir"
            )


def train(
    config: Config,
    *,
    dist: DistInfo | None = None,
    eval_hook: EvalHook | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model as configured; resume, log, sample and checkpoint along the way.

    Args:
        config: the validated run config.
        dist: rank layout (default: a single process).
        eval_hook: called as ``hook(step, ema_model, resolved_config)`` every ``eval.every``
            steps and at the end, on rank 0;
            its returned metrics are logged with the step and wall-clock seconds.
        progress: show a tqdm progress bar on rank 0.

    Returns:
        TrainResult with the final step and checkpoint.

    Raises:
        ConfigError / DataError / CheckpointError: bad input, before anything is written.
        NonFiniteLossError: the loss diverged; the last good checkpoint is left intact.
    """
    info = dist or DistInfo()
    tc = config.train
    device = pick_device(tc.device, info)
    if tc.batch_size % info.world_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not divisible by the {info.world_size} ranks"
        )
    local_batch = tc.batch_size // info.world_size
    rows = slice(info.rank * local_batch, (info.rank + 1) * local_batch)

    data = load_data(config)
    config = with_data_shape(config, data)
    run_dir, resume_from = _prepare_run_dir(config, info)
    model = build_from_config(config).to(device)
    objective = objective_from_config(config)
    ema = make_ema(model)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    stream = BatchStream(
        data,
        batch_size=local_batch,
        seed=tc.seed,
        rank=info.rank,
        world_size=info.world_size,
        hflip=config.data.hflip,
    )
    step, elapsed_before, side_before = 0, 0.0, 0.0
    if resume_from is not None:
        _check_compatible(ckpt.read_config(resume_from), config, resume_from)
        ckpt.load_weights(model, resume_from / "model.safetensors")
        ckpt.load_weights(ema, resume_from / "ema.safetensors")
        state = ckpt.load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["loop"]["data"])
        step = int(state["loop"]["step"])
        elapsed_before = float(state["loop"].get("elapsed", 0.0))
        side_before = float(state["loop"].get("side", 0.0))
        log.info("resumed from %s at step %d", resume_from, step)

    init_process_group(info, device)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile:
        net = torch.compile(net)
    precision = tc.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"

    metrics = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(config))
        metrics = MetricsLog(
            run_dir, resume_step=step if resume_from else None, tensorboard=tc.tensorboard
        )

    shape = tuple(data.shape)
    null_label = config.model.num_classes
    clock = _Clock(elapsed_before, side_before)
    last_log_time, last_log_step = time.perf_counter(), step
    loss_sum, loss_count, grad_norm = 0.0, 0, float("nan")
    last_checkpoint = resume_from
    side_at_log = clock.side
    stopped = "steps"
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        total = tc.steps if tc.max_minutes is None else None  # projected after the first log
        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def loop_state() -> dict[str, Any]:
        return {
            "step": step,
            "data": stream.state_dict(),
            "elapsed": clock.elapsed(),
            "side": clock.side,
            "seed": tc.seed,
        }

    def save() -> Path | None:
        if not info.is_main:
            return None
        return ckpt.save_checkpoint(
            run_dir,
            step,
            model=model,
            ema=ema,
            optimizer=optimizer,
            config=config,
            loop_state=loop_state(),
            keep_last=tc.keep_last,
        )

    def sample_grid() -> None:
        if info.is_main and config.sample.grid_size > 0:
            save_sample_grid(ema, config, run_dir / "samples" / f"step_{step:07d}.png", device)

    try:
        while step < tc.steps:
            model.train()
            x0, y = next(stream)
            x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
            drop, t, noise, plans = _step_draws(
                config, objective, model, step, tc.batch_size, rows, shape, device
            )
            y = torch.where(drop, torch.full_like(y, null_label), y)
            lr = (
                config.optim.lr * min(1.0, (step + 1) / config.optim.warmup_steps)
                if (config.optim.warmup_steps)
                else config.optim.lr
            )
            for group in optimizer.param_groups:
                group["lr"] = lr

            def routed_net(x: Tensor, t_: Tensor, y_: Tensor, plans=plans) -> Tensor:
                return net(x, t_, y_, plans=plans or None)

            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = objective.loss_at(routed_net, x0, y, t, noise.to(x0.dtype)).mean()
            if not all_true(bool(torch.isfinite(loss)), info, device):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}; stopped without saving "
                    f"(last good checkpoint: {last_checkpoint or 'none'})"
                )
            loss.backward()
            if config.optim.grad_clip is not None:
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                )
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {step}; stopped without saving "
                        f"(last good checkpoint: {last_checkpoint or 'none'})"
                    )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, ema_decay(step, config.ema.decay, config.ema.warmup))
            step += 1
            loss_sum += float(loss.detach())
            loss_count += 1
            if bar is not None:
                bar.update(1)

            out_of_time = tc.max_minutes is not None and clock.train_seconds() > 60 * tc.max_minutes
            out_of_time = not all_true(not out_of_time, info, device)
            last = step == tc.steps or out_of_time
            if step % tc.log_every == 0 or last:
                now = time.perf_counter()
                side_since_log = clock.side - side_at_log
                mean_loss = mean_across(loss_sum / loss_count, info, device)
                # Side work since the last log (grids, checkpoints) is not training speed.
                rate = (step - last_log_step) / max(now - last_log_time - side_since_log, 1e-9)
                row = {
                    "step": step,
                    "loss": mean_loss,
                    "lr": lr,
                    "it_s": rate,
                    "img_s": rate * tc.batch_size,
                    "elapsed_s": clock.elapsed(),
                    "train_s": clock.train_seconds(),
                }
                if config.optim.grad_clip is not None:
                    row["grad_norm"] = grad_norm
                if metrics is not None:
                    metrics.write(row)
                if bar is not None:
                    bar.total = _projected_steps(step, rate, clock.train_seconds(), tc)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum, loss_count = 0.0, 0
                last_log_time, last_log_step, side_at_log = now, step, clock.side

            if (
                eval_hook is not None
                and config.eval.every
                and (step % config.eval.every == 0 or last)
            ):
                # Stamp the row with the clock as it stood before the evaluation ran.
                stamp = {"elapsed_s": clock.elapsed(), "train_s": clock.train_seconds()}
                with clock.side_work():
                    if info.is_main:
                        results = eval_hook(step, ema, config)
                        metrics.write(
                            {"step": step, **{f"eval/{k}": v for k, v in results.items()}, **stamp}
                        )
                    barrier(info)
            with clock.side_work():
                if tc.sample_every and step % tc.sample_every == 0:
                    sample_grid()
                if (tc.ckpt_every and step % tc.ckpt_every == 0) or last:
                    last_checkpoint = save() or last_checkpoint
                    barrier(info)
            if out_of_time:
                stopped = "time"
                break
        if info.is_main:
            if not (tc.sample_every and step % tc.sample_every == 0):
                sample_grid()
            from ..visual import plot_loss_curve

            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(run_dir, step, last_checkpoint, stopped, config)


def save_sample_grid(model: nn.Module, config: Config, path: Path, device: torch.device) -> Path:
    """A grid of EMA samples with fixed seeds; labels cycle 0..K-1 (one class per column)."""
    from ..generate import generate, sample_labels
    from ..visual import save_grid

    count = config.sample.grid_size
    labels = sample_labels(count, config.model.num_classes)
    seeds = [config.sample.seed + i for i in range(count)]
    images = torch.cat([x for x, _ in generate(model, config, labels, seeds, device=device)])
    scale = max(1, 96 // config.model.input_size)  # make 8x8 digits visible
    return save_grid(images, path, nrow=min(count, max(config.model.num_classes, 1)), scale=scale)
