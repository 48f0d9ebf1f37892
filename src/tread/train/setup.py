"""Everything a training does before its first step: checks and resume first, then writes.

Order matters: no file is written until every check has passed. Rank 0 locks an existing run
directory before reading it (another training may be writing it) and a new one only once the
checks have passed, then writes the config and opens the logs; then all ranks join.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig, config_to_yaml
from ..data import BatchStream, ImageArrays
from ..data.loader import Prefetcher
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from .builders import build_from_config, objective_from_config
from .dist import DistInfo, init_process_group
from .ema import make_ema
from .init_weights import init_from_weights
from .metrics_log import MetricsLog
from .phases import fix_schedule_horizons
from .rundir import (
    RunLock,
    check_changes,
    check_writable,
    config_changes,
    finetune_locked,
    record_changes,
)
from .state import Clock, LossWindow, RunState

log = logging.getLogger(__name__)

Changes = dict[str, tuple[Any, Any]]


def pick_device(name: str, info: DistInfo) -> torch.device:
    """The device of this rank: ``cuda:{local_rank}`` (made current) or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise ConfigError(
            f"train.device=cuda: local rank {info.local_rank} but only {count} CUDA devices"
        )
    # Make it current, so that code saying just "cuda" (NCCL, new tensors, libraries) uses this
    # rank's GPU, not GPU 0 on every rank.
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def check_batch_split(tc: TrainConfig, world_size: int) -> str:
    """The global batch split over ranks and micro-batches, as one line for logs and --dry-run.

    Under ``train.parallel=fsdp`` the line also says what is sharded (or that one process runs
    the plain model).

    Raises:
        ConfigError: ``train.batch_size`` does not split into ranks x ``train.grad_accum``
            equal micro-batches.
    """
    parts = world_size * tc.grad_accum
    if tc.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not divisible by {world_size} rank(s) x "
            f"train.grad_accum={tc.grad_accum} micro-batches"
        )
    micro = tc.batch_size // parts
    line = (
        f"global batch {tc.batch_size} = {world_size} rank(s) x {tc.grad_accum} micro-batch(es) "
        f"x {micro} samples; one optimizer update per {tc.grad_accum} forward/backward pass(es)"
    )
    if tc.parallel != "fsdp":
        return line
    if world_size == 1:
        return f"{line}; fsdp with one process: the plain model, nothing to shard"
    return (
        f"{line}; fsdp: parameters, gradients, optimizer state and EMA sharded over "
        f"{world_size} ranks"
    )


def uses_fsdp(tc: TrainConfig, info: DistInfo) -> bool:
    """Whether this run shards its model with FSDP2 (``train.parallel=fsdp``, several ranks)."""
    return info.enabled and tc.parallel == "fsdp"


def start_run(
    config: Config, data: ImageArrays, info: DistInfo, *, allow_changes: bool, progress: bool
) -> RunState:
    """Build (and resume) the run of a resolved config; see the module docstring for the order."""
    tc = config.train
    device = pick_device(tc.device, info)
    split = check_batch_split(tc, info.world_size)
    if info.is_main and (tc.grad_accum > 1 or tc.parallel == "fsdp"):
        log.info(split)
    run_dir = Path(tc.run_dir)
    with ExitStack() as on_error:  # on failure: unlock, close what was opened
        lock = None
        if info.is_main:
            check_writable(run_dir)
            if run_dir.is_dir():
                lock = RunLock(run_dir)
                on_error.callback(lock.release)
                # Before choosing the checkpoint: this may put back one a kill left aside.
                ckpt.remove_stale_partials(run_dir)
        # FSDP shards at build time (the optimizer must see the sharded parameters), so its
        # ranks join the process group first; DDP joins after the resume, as it always did.
        host_group = _join_group(config, info, device) if uses_fsdp(tc, info) else None
        run = _build(config, data, info, device, run_dir)
        run.host_group = host_group
        run.lock = lock
        on_error.callback(run.close)
        resume_from = ckpt.resume_source(config, run_dir)
        if resume_from:
            changes = _resume(run, resume_from, allow_changes)
        else:  # a fresh run: a schedule's horizon None is this run's train.steps, for good
            changes, run.config = {}, fix_schedule_horizons(run.config)
            init_from_weights(run)  # train.init_from: checked, then loaded; still nothing written
        if info.is_main and run.lock is None:  # a new directory: created only now
            run.lock = RunLock(run_dir)
            if ckpt.list_checkpoints(run_dir):
                raise ConfigError(f"train.run_dir={run_dir} was filled while starting; run again")
        _open_outputs(run, resume_from, changes, progress)
        _join_ranks(run)
        run.batches = Prefetcher(run.stream, device)
        on_error.pop_all()  # success: from here train() closes the run
    return run


def _join_group(
    config: Config, info: DistInfo, device: torch.device
) -> torch.distributed.ProcessGroup | None:
    """Join the process group (see :func:`~tread.train.dist.init_process_group`)."""
    timeout = config.train.dist_timeout_minutes
    return init_process_group(info, device, timeout_minutes=timeout)


def _build(
    config: Config, data: ImageArrays, info: DistInfo, device: torch.device, run_dir: Path
) -> RunState:
    """Model, EMA, objective, optimizer and data stream of a fresh run.

    Under FSDP the EMA is copied from the model before both are sharded alike, so that their
    local shards match parameter by parameter (``update_ema`` works on them).
    """
    model = build_from_config(config).to(device)
    ema = make_ema(model)
    sharded = uses_fsdp(config.train, info)
    if sharded:
        from .fsdp import make_mesh, shard_model

        mesh = make_mesh(device, info.world_size)
        shard_model(model, mesh)
        shard_model(ema, mesh)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    stream = BatchStream(
        data,
        batch_size=config.train.batch_size // info.world_size,
        seed=config.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        hflip=config.data.hflip,
    )
    objective = objective_from_config(config)
    run = RunState(config, info, device, model, ema, objective, optimizer, stream, run_dir)
    run.sharded = sharded
    return run


def _resume(run: RunState, checkpoint: Path, allow_changes: bool) -> Changes:
    """Load a checkpoint into the run after checking that it fits; returns the config changes."""
    saved = ckpt.read_config(checkpoint)
    # Configs saved before architecture fields were resolved hold None where the registry's
    # value applies: fill them the same way before comparing.
    saved = dataclasses.replace(saved, model=saved.model.with_architecture())
    step = ckpt.read_meta(checkpoint)["step"]
    # A horizon None continues the checkpoint's: more train.steps must not stretch a schedule.
    run.config = fix_schedule_horizons(run.config, saved)
    _keep_init_history(run, saved, checkpoint)
    check_compatible(saved, run.config, checkpoint)
    changes = config_changes(saved, run.config)
    locked = finetune_locked(saved, run.config, step)
    check_changes(changes, checkpoint, allow=allow_changes, locked=locked)
    state = ckpt.load_training_state(checkpoint)
    _load_weights_and_optimizer(run, checkpoint, state)
    file = checkpoint / "state.pt"
    try:
        run.stream.load_state_dict(state["loop"]["data"])
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}") from None
    loop = state["loop"]
    run.step = loop["step"]
    run.clock = Clock(float(loop.get("elapsed", 0.0)), float(loop.get("side", 0.0)))
    run.last_checkpoint = checkpoint
    log.info("resumed from %s at step %d", checkpoint, run.step)
    return changes


def _load_weights_and_optimizer(run: RunState, checkpoint: Path, state: dict[str, Any]) -> None:
    """Model, EMA and optimizer state of a checkpoint, whatever wrote it, into this run.

    An FSDP checkpoint's ``sharded/`` loads into a sharded or a plain model (any world size);
    a DDP or one-process checkpoint's full files load into either too.
    """
    if ckpt.is_sharded_checkpoint(checkpoint):
        from .fsdp import load_sharded_checkpoint

        load_sharded_checkpoint(checkpoint, run.model, run.ema, run.optimizer)
        return
    ckpt.load_weights(run.model, checkpoint / "model.safetensors")
    ckpt.load_weights(run.ema, checkpoint / "ema.safetensors")
    file = checkpoint / "state.pt"
    if run.sharded:
        from .fsdp import load_full_optimizer

        load_full_optimizer(run.model, run.optimizer, state["optimizer"], file)
        return
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"optimizer state in {file} does not fit the model: {err}") from None


def _keep_init_history(run: RunState, saved: Config, checkpoint: Path) -> None:
    """Resume wins over ``train.init_from``: the weights come from the run's own checkpoint.

    The run keeps the ``init_from`` it started with, so its config.yaml keeps saying where its
    first weights came from, and a resume that changes or drops the key changes nothing.
    """
    given = run.config.train.init_from
    if given is not None:
        log.info("train.init_from=%s ignored: resuming from %s", given, checkpoint)
    if given != saved.train.init_from:
        train = dataclasses.replace(run.config.train, init_from=saved.train.init_from)
        run.config = dataclasses.replace(run.config, train=train)


def check_compatible(saved: Config, current: Config, source: Path) -> None:
    """Refuse a checkpoint of another model, objective or dataset."""
    for section in ("model", "objective", "data"):
        a, b = getattr(saved, section), getattr(current, section)
        if a != b:
            diff = [k for k in vars(a) if getattr(a, k) != getattr(b, k)]
            raise CheckpointError(
                f"checkpoint {source} was trained with a different {section} config "
                f"({', '.join(f'{section}.{k}' for k in diff)}); use a new train.run_dir"
            )


def _open_outputs(
    run: RunState, resume_from: Path | None, changes: Changes, progress: bool
) -> None:
    """Rank 0 writes the run's config (recording resume changes), opens the logs and the bar."""
    run.window = LossWindow(run.device, run.step, run.clock.side)
    if not run.info.is_main:
        return
    tc = run.config.train
    resume_step = run.step if resume_from else None
    run.metrics = MetricsLog(run.run_dir, resume_step=resume_step, tensorboard=tc.tensorboard)
    if resume_from is not None:
        record_changes(run.run_dir, run.step, resume_from, changes)
    (run.run_dir / "config.yaml").write_text(config_to_yaml(run.config))
    if progress:
        from tqdm.auto import tqdm

        total = tc.steps if tc.max_minutes is None else None  # projected after the first log
        run.bar = tqdm(total=total, initial=run.step, desc="train", unit="step", dynamic_ncols=True)


def _join_ranks(run: RunState) -> None:
    """Join the process group (FSDP joined it before sharding); wrap for DDP and torch.compile.

    An FSDP model needs no wrapper: ``fully_shard`` made its parameters shards and hooked its
    forward and backward (all-gathers, reduce-scatters) in place.
    """
    net: nn.Module = run.model
    if not run.sharded:
        run.host_group = _join_group(run.config, run.info, run.device)
    if run.info.enabled and not run.sharded:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    run.net = torch.compile(net) if run.config.train.compile else net
