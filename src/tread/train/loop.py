"""The training loop: one function, any backbone, any objective, one or many processes.

Randomness: every per-step draw (label dropout, noise level, noise, token subsets) comes from a
generator seeded by (seed, step), drawn for the *global* batch and sliced per rank, then per
micro-batch (``train.grad_accum``). So a run resumed from a checkpoint continues exactly as an
uninterrupted one, and N ranks x A micro-batches of b samples compute the same update as one
process with batch N*A*b at once (up to float summation order).

Synchronisation: an ordinary step never waits for the device. Its loss and health (finite loss
and gradient norm) accumulate on the device and are read on sync steps only: log, checkpoint,
sample-grid and evaluation steps and the last step. A non-finite step stops the run at the
next sync step, before anything from it is saved.

Parallelism (``train.parallel``): DDP all-reduces gradients on a step's last micro-batch only;
FSDP2 (:mod:`tread.train.fsdp`) reduce-scatters them after every micro-batch into the sharded
gradients, so accumulation never holds a full-size gradient (one more reduce-scatter per
micro-batch, beside the parameter all-gathers every micro-batch does anyway).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, TrainConfig
from ..errors import TreadError
from ..routing import Route, RoutePlan, sample_plan
from ..seeding import derive_seed
from . import checkpoint as ckpt
from .builders import prepare_run
from .dist import DistInfo, all_true, barrier
from .ema import ema_decay, update_ema
from .phases import FINETUNE_EVENT, learning_rate, step_fields, step_routes
from .setup import start_run
from .state import RunState, projected_steps

__all__ = ["EvalHook", "NonFiniteLossError", "TrainResult", "train"]

log = logging.getLogger(__name__)

# Called as hook(step, ema_model, resolved_config) on EVERY rank: sample generation is spread
# across ranks inside it (a collective). It returns the metrics on rank 0 and {} on the others;
# the loop writes them, with the step and the clock, on rank 0.
EvalHook = Callable[[int, nn.Module, Config], dict[str, float]]


class NonFiniteLossError(TreadError):
    """Training stopped because the loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped: str  # "steps" | "time"
    config: Config


def train(
    config: Config,
    *,
    dist: DistInfo | None = None,
    eval_hook: EvalHook | None = None,
    progress: bool = True,
    allow_changes: bool = False,
) -> TrainResult:
    """Train a model as configured; resume, log, checkpoint, sample and evaluate along the way.

    Args:
        config: the validated run config.
        dist: rank layout (default: a single process).
        eval_hook: see :data:`EvalHook`; called every ``eval.every`` steps and at the end.
        progress: show a tqdm progress bar on rank 0.
        allow_changes: resume even if settings that change the results (``optim.lr``, ...)
            differ from the checkpoint's; the changes are recorded in config_changes.jsonl.

    Returns:
        TrainResult with the final step and checkpoint.

    Raises:
        ConfigError / DataError / CheckpointError: bad input, before anything is written.
        NonFiniteLossError: the loss diverged; the last good checkpoint is left intact.
    """
    info = dist or DistInfo()
    config, data = prepare_run(config)  # every config and data check; writes nothing
    run = start_run(config, data, info, allow_changes=allow_changes, progress=progress)
    config = run.config  # with the schedules' horizons fixed (see phases.fix_schedule_horizons)
    tc = config.train
    try:
        while run.step < tc.steps:
            if run.step == tc.finetune_from:
                _announce_finetune(run)
            lr = _train_step(run)
            out_of_time = _out_of_time(run)
            last = run.step == tc.steps or out_of_time
            if last or _sync_due(run.step, config, eval_hook):
                _check_and_log(run, lr, last)  # raises on a non-finite step: nothing saved
                _side_work(run, eval_hook, last)
            if out_of_time:
                run.stopped = "time"
                break
        if info.is_main:
            from ..visual import plot_loss_curve

            plot_loss_curve(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    finally:
        run.close()
    return TrainResult(run.run_dir, run.step, run.last_checkpoint, run.stopped, config)


def _announce_finetune(run: RunState) -> None:
    """Before the first dense fine-tune step: a log line and a one-off metrics row (rank 0).

    A run resumed exactly at the switch may find the row already written by the run it
    continues (after its last checkpoint): then it is not written twice.
    """
    if run.metrics is None:
        return
    from ..visual import read_metrics

    step, tc = run.step, run.config.train
    lr = learning_rate(run.config, step)
    log.info("step %d: dense fine-tune phase starts: routing off, learning rate %g", step, lr)
    rows = read_metrics(run.metrics.path)
    if not any(r.get("event") == FINETUNE_EVENT and r.get("step") == step for r in rows):
        row = {"step": step, "event": FINETUNE_EVENT, "lr": lr, "finetune_lr": tc.finetune_lr}
        run.metrics.write({**row, **run.clock.stamp()})


def _train_step(run: RunState) -> float:
    """One optimizer update; no device->host synchronisation. Returns its learning rate."""
    config, step = run.config, run.step
    run.model.train()
    x0, y = next(run.batches)
    shape = tuple(x0.shape[1:])  # (C, H, W)
    routes = step_routes(config, run.model.routes, step)  # () in the dense fine-tune phase
    drop, t, noise, plans = _step_draws(
        config, run.objective, run.model, routes, step, run.rows, shape, run.device
    )
    y = torch.where(drop, torch.full_like(y, config.model.num_classes), y)
    lr = learning_rate(config, step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    accum = config.train.grad_accum
    micro = x0.shape[0] // accum
    loss = torch.zeros((), device=x0.device)
    for index in range(accum):
        rows = slice(index * micro, (index + 1) * micro)  # this micro-batch of the rank's rows
        last = index == accum - 1
        # DDP all-reduces gradients on the last micro-batch only; the others just accumulate.
        # (FSDP reduce-scatters every micro-batch: see the module docstring.)
        with _sync_grads(run.net, last):
            part = _micro_loss(run, routes, x0[rows], y[rows], t[rows], noise[rows], plans, rows)
            # Equal micro-batches: the mean of their means is the mean over the rank's batch.
            (part / accum).backward()
        loss = loss + part.detach() / accum
    grad_norm = None
    if config.optim.grad_clip is not None:  # a tensor: reading it would be a sync
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.optim.grad_clip)
        if run.sharded:  # the norm over every rank's shards, a replicated DTensor
            from .fsdp import plain_tensor

            grad_norm = plain_tensor(grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema, run.model, ema_decay(step, config.ema.decay, config.ema.warmup))
    run.window.add(loss, grad_norm)
    run.step += 1
    if run.bar is not None:
        run.bar.update(1)
    return lr


def _micro_loss(
    run: RunState,
    routes: Sequence[Route],
    x0: Tensor,
    y: Tensor,
    t: Tensor,
    noise: Tensor,
    plans: Sequence[RoutePlan],
    rows: slice,
) -> Tensor:
    """Mean loss of one micro-batch, routed with its rows of the step's plans."""
    micro_plans = [RoutePlan(plan.keep[rows]) for plan in plans]  # (b, K) -> (m, K)

    def routed_net(x: Tensor, t_: Tensor, y_: Tensor) -> Tensor:
        return run.net(x, t_, y_, routes=routes, plans=micro_plans or None)

    bf16 = _precision(run.config.train, run.device) == "bf16"
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
        return run.objective.loss_at(routed_net, x0, y, t, noise.to(x0.dtype)).mean()


def _sync_grads(net: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` unless ``sync`` (or the model is not DDP-wrapped)."""
    ddp = getattr(net, "_orig_mod", net)  # under torch.compile, the wrapped module
    if sync or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def _precision(tc: TrainConfig, device: torch.device) -> str:
    if tc.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return tc.precision


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def _sync_due(step: int, config: Config, eval_hook: EvalHook | None) -> bool:
    """Whether this step logs or does side work (and so syncs with the device)."""
    tc = config.train
    every = (tc.log_every, tc.ckpt_every, tc.sample_every, eval_hook and config.eval.every)
    return any(_due(step, e) for e in every)


def _out_of_time(run: RunState) -> bool:
    """The time budget is spent on some rank (all ranks then stop at this step)."""
    tc = run.config.train
    if tc.max_minutes is None:
        return False
    spent = run.clock.train_seconds() > 60 * tc.max_minutes
    return not all_true(not spent, run.info, run.host_group)


def _check_and_log(run: RunState, lr: float, last: bool) -> None:
    """Check the steps since the last sync were finite; on log steps write the metrics row."""
    window, clock, tc = run.window, run.clock, run.config.train
    mean_loss, grad_norm, non_finite = window.read(run.info)  # sync (all ranks agree)
    if non_finite:
        raise NonFiniteLossError(
            f"non-finite loss or gradient norm within steps {window.checked + 1}..{run.step}; "
            f"stopped without saving (last good checkpoint: {run.last_checkpoint or 'none'})"
        )
    window.checked = run.step
    if not (_due(run.step, tc.log_every) or last):
        return
    now = time.perf_counter()
    # Side work since the last log (grids, checkpoints, evaluation) is not training speed.
    busy = now - window.time - (clock.side - window.side)
    rate = (run.step - window.step) / max(busy, 1e-9)
    row = {
        "step": run.step,
        "loss": mean_loss,
        "lr": lr,
        "it_s": rate,
        "img_s": rate * tc.batch_size,
        **clock.stamp(),
        # How the last step was routed (phase, scheduled ratios); empty for a plain run.
        **step_fields(run.config, run.model.routes, run.model.num_tokens, run.step - 1),
    }
    if run.config.optim.grad_clip is not None:
        row["grad_norm"] = grad_norm
    if run.device.type == "cuda":  # the most this rank's tensors have held since the start
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    if run.metrics is not None:
        run.metrics.write(row)
    if run.bar is not None:
        run.bar.total = projected_steps(run.step, rate, clock.train_seconds(), tc)
        run.bar.set_postfix(loss=f"{mean_loss:.4f}")
    window.reset(run.step, clock.side)


def _side_work(run: RunState, eval_hook: EvalHook | None, last: bool) -> None:
    """Checkpoint first, then the sample grid and evaluation: a failure there loses nothing."""
    config, info, step, clock = run.config, run.info, run.step, run.clock
    tc = config.train
    if _due(step, tc.ckpt_every) or last:
        with clock.side_work():
            run.last_checkpoint = _save(run) or run.last_checkpoint
            barrier(info, run.host_group)
    if _due(step, tc.sample_every) or last:
        with clock.side_work():
            if config.sample.grid_size > 0:
                ema = _whole_ema(run, everywhere=False)  # rank 0 only (a collective under FSDP)
                if info.is_main:
                    path = run.run_dir / "samples" / f"step_{step:07d}.png"
                    save_sample_grid(ema, config, path, run.device)
            barrier(info, run.host_group)
    if eval_hook is not None and (_due(step, config.eval.every) or (last and config.eval.every)):
        # Stamp the row with the clock as it stood before the evaluation ran.
        stamp = clock.stamp()
        with clock.side_work():
            ema = _whole_ema(run, everywhere=True)
            results = eval_hook(step, ema, config)  # collective: every rank calls it
            if run.metrics is not None:
                evals = {f"eval/{k}": v for k, v in results.items()}
                run.metrics.write({"step": step, **evals, **stamp})
            barrier(info, run.host_group)


def _whole_ema(run: RunState, *, everywhere: bool) -> nn.Module | None:
    """The EMA as a plain module: itself, or under FSDP a gathered copy (on rank 0 only unless
    ``everywhere``; every rank must call it then). Sample grids and evaluation call a model a
    different number of times per rank, which a sharded model, gathering per call, cannot."""
    if not run.sharded:
        return run.ema
    from .fsdp import full_copy

    return full_copy(run.ema, run.config, run.device, run.info, everywhere=everywhere)


def _save(run: RunState) -> Path | None:
    """Write a checkpoint of the current step (its health was checked just before): rank 0
    alone, or under FSDP every rank its shards. Returns its directory on rank 0."""
    if not (run.info.is_main or run.sharded):
        return None
    loop_state = {
        "step": run.step,
        "data": run.batches.state_dict(),  # batches consumed, not those read ahead
        "elapsed": run.clock.elapsed(),
        "side": run.clock.side,
        "seed": run.config.train.seed,
    }
    parts = {
        "model": run.model,
        "ema": run.ema,
        "optimizer": run.optimizer,
        "config": run.config,
        "loop_state": loop_state,
        "keep_last": run.config.train.keep_last,
    }
    if run.sharded:
        from .fsdp import save_sharded_checkpoint

        return save_sharded_checkpoint(
            run.run_dir, run.step, **parts, info=run.info, group=run.host_group
        )
    return ckpt.save_checkpoint(run.run_dir, run.step, **parts)


def _step_draws(
    config: Config,
    objective: Any,
    model: nn.Module,
    routes: Sequence[Route],
    step: int,
    rows: slice,
    shape: tuple[int, ...],
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, list[RoutePlan]]:
    """All randomness of one step for the global batch, sliced to this rank's rows.

    The plans come last from the (seed, step) stream, one per route of the step (``routes``:
    the step's ratios, none in the fine-tune phase), with one kept count K for the whole batch.
    """
    global_batch = config.train.batch_size
    g = torch.Generator(device=device).manual_seed(derive_seed(config.train.seed, "step", step))
    drop = torch.rand(global_batch, generator=g, device=device) < config.train.class_dropout
    like = torch.empty(global_batch, device=device)
    time_ = objective.sample_time(global_batch, like=like, generator=g)  # (B,)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)  # (B, C, H, W)
    plans = []
    N = model.num_tokens
    for route in routes:
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
