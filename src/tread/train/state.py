"""What a training holds between its steps: the objects, the clock and the loss window."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from ..config import Config, TrainConfig
from ..data import BatchStream
from ..data.loader import Prefetcher
from .dist import DistInfo, sum_across
from .metrics_log import MetricsLog
from .rundir import RunLock


class Clock:
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

    def stamp(self) -> dict[str, float]:
        """Both clocks read at one instant (two reads could put train_s past elapsed_s)."""
        elapsed = self.elapsed()
        return {"elapsed_s": elapsed, "train_s": elapsed - self.side}

    @contextmanager
    def side_work(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.side += time.perf_counter() - begin


def projected_steps(step: int, rate: float, train_seconds: float, tc: TrainConfig) -> int:
    """Steps the run will reach: ``tc.steps``, or fewer when the time budget runs out first.

    Used as the progress bar's total so that its ETA is right for time-budgeted runs.
    """
    if tc.max_minutes is None:
        return tc.steps
    left = max(60 * tc.max_minutes - train_seconds, 0.0)
    return min(tc.steps, step + math.ceil(rate * left))


class LossWindow:
    """Loss and health of the steps since the last log, kept on the device.

    Adding a step costs a few device ops and no synchronisation; :meth:`read` copies the sums
    to the host (and sums them over ranks), which the loop does on sync steps only.
    """

    def __init__(self, device: torch.device, step: int, side: float) -> None:
        self.loss_sum = torch.zeros((), device=device)  # this rank's losses since the log
        self.bad = torch.zeros((), device=device)  # non-finite losses / grad norms (never reset:
        # the run stops at the first read that finds one)
        self.grad_norm = torch.full((), math.nan, device=device)  # of the latest step
        self.checked = step  # the last step known to be finite
        self.reset(step, side)

    def add(self, loss: Tensor, grad_norm: Tensor | None) -> None:
        loss = loss.detach().float()
        self.loss_sum += loss
        self.bad += (~torch.isfinite(loss)).float()
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float()
            self.bad += (~torch.isfinite(self.grad_norm)).float()
        self.steps += 1

    def read(self, info: DistInfo) -> tuple[float, float, bool]:
        """(mean loss over ranks, grad norm, whether any rank saw a non-finite step)."""
        packed = sum_across(torch.stack([self.loss_sum, self.bad, self.grad_norm]), info)
        loss_sum, bad, grad_norm = packed.tolist()  # the one device->host copy
        world = info.world_size
        return loss_sum / max(self.steps * world, 1), grad_norm / world, bad > 0

    def reset(self, step: int, side: float) -> None:
        """Start a new log window after ``step`` (``side``: the clock's side work so far)."""
        self.loss_sum.zero_()
        self.steps = 0
        self.time, self.step, self.side = time.perf_counter(), step, side


@dataclass
class RunState:
    """Everything a training holds between steps, so each phase of ``train()`` is a function."""

    config: Config
    info: DistInfo
    device: torch.device
    model: nn.Module
    ema: nn.Module
    objective: Any
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    run_dir: Path
    step: int = 0
    clock: Clock = field(default_factory=Clock)
    last_checkpoint: Path | None = None
    stopped: str = "steps"  # "steps" | "time"
    lock: RunLock | None = None  # rank 0 only
    net: nn.Module | None = None  # the model as trained: DDP / compile wrappers
    # FSDP2 (train.parallel=fsdp, several ranks): model, EMA and optimizer state are sharded
    sharded: bool = False
    host_group: torch_dist.ProcessGroup | None = None  # gloo group for host-side flags
    batches: Prefetcher | None = None
    window: LossWindow | None = None
    metrics: MetricsLog | None = None  # rank 0 only
    bar: Any = None  # tqdm, rank 0 only

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch."""
        local = self.config.train.batch_size // self.info.world_size
        return slice(self.info.rank * local, (self.info.rank + 1) * local)

    def close(self) -> None:
        """Stop the prefetch thread, close the logs, release the run directory."""
        for part in (self.bar, self.metrics, self.batches):
            if part is not None:
                part.close()
        if self.lock is not None:
            self.lock.release()
