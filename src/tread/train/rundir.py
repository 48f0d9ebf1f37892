"""The run directory: checks before writing, an exclusive lock, and a record of config changes.

One training owns a run directory at a time. The lock is an ``flock`` on ``<run>/.lock``: the
kernel releases it when its process dies, so a lock left by a killed run is simply free again.
The file records the holder's pid and host for the refusal message; a clean exit empties it, so
a non-empty but unlocked file means the previous holder was killed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..config import Config, config_to_dict
from ..errors import ConfigError
from ..paths import check_creatable

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CHANGES_FILE = "config_changes.jsonl"

# Settings a resume may change without asking, because they say how long, how often or on what
# hardware to train, not what is learnt: more steps or a new time budget, logging/checkpoint/
# sample/eval cadence, rotation, threads, compilation, where the run lives (a fork resumes into
# a new train.run_dir), the preset's name, and the grid size (pictures only). Everything else
# (optimizer, EMA, seed, batch, precision, sampler and eval settings that make metrics
# comparable) changes the run's results and must be accepted explicitly.
ALLOWED_CHANGES = frozenset(
    {
        "preset",
        "train.run_dir",
        "train.steps",
        "train.max_minutes",
        "train.resume",
        "train.log_every",
        "train.ckpt_every",
        "train.keep_last",
        "train.sample_every",
        "train.tensorboard",
        "train.num_threads",
        # The update is that of the whole global batch however it is split (tested), so a run
        # may resume with another accumulation (e.g. on fewer GPUs).
        "train.grad_accum",
        # Neither changes the update: checkpointing recomputes the same activations, and the
        # FSDP and DDP updates are equal (tested); the checkpoint's format follows the run.
        "train.activation_checkpointing",
        "train.parallel",
        "train.compile",
        "train.tf32",
        "train.device",
        "train.dist_timeout_minutes",
        "eval.every",
        # Where the decoder lives (like $TREAD_VAE, which no config records): moving the folder
        # must not block a resume. Use the VAE the latents were encoded with.
        "eval.vae",
        "sample.grid_size",
        # A dense fine-tune phase may be added, moved or dropped while it lies ahead: this is
        # how a finished routed run is fine-tuned (train.finetune_from=<its step> plus more
        # train.steps). Once it has begun (or would begin in the past) see finetune_locked.
        "train.finetune_from",
        "train.finetune_lr",
        # Where a run's first weights came from: a resume loads its own checkpoint instead
        # (setup keeps the run's first value in its config, so this is never a change there).
        "train.init_from",
    }
)
FINETUNE_KEYS = ("train.finetune_from", "train.finetune_lr")


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be created or written, before anything is written.

    Raises:
        ConfigError: naming ``train.run_dir`` and the offending path.
    """
    check_creatable(run_dir, f"train.run_dir={run_dir}")
    for path in (run_dir / "checkpoints", run_dir / "samples", run_dir / "eval"):
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"train.run_dir={run_dir}: directory {path} is not writable")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"train.run_dir={run_dir}: {path} is a file, not a directory")
    for name in ("config.yaml", "metrics.jsonl", CHANGES_FILE, LOCK_FILE):
        path = run_dir / name
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"train.run_dir={run_dir}: file {path} is not writable")


class RunLock:
    """An exclusive, process-lifetime lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"train.run_dir={run_dir} cannot be written: {err}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self._read())
            self._close()
            raise ConfigError(
                f"train.run_dir={run_dir} is in use by another training ({holder}); "
                f"wait for it or choose another train.run_dir (lock file {self.path})"
            ) from None
        previous = self._read()
        if previous:
            log.warning("took over %s from a process that was killed (%s)", self.path, previous)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {"pid": "unknown"}

    def release(self) -> None:
        """Empty the record (a clean exit), then unlock. Idempotent."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "pid unknown"
    return f"pid {holder.get('pid', 'unknown')} on {holder.get('host', 'an unknown host')}"


def config_changes(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between a checkpoint's config and this run's: key -> (saved, new)."""
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(current))
    keys = sorted(old.keys() | new.keys())
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (one level: lists such as routes stay)."""
    flat = {}
    for section, values in tree.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def finetune_locked(saved: Config, current: Config, step: int) -> frozenset[str]:
    """The fine-tune keys a resume at ``step`` must not change silently.

    Once the dense phase has run a step (the checkpoint's ``finetune_from`` < ``step``), its
    start and rate are history: changing them would make config.yaml describe a run that did
    not happen, and a resume from an earlier checkpoint would no longer reproduce this one.
    The same holds for a new ``finetune_from`` before ``step`` (a switch in the past: those
    steps ran routed). A switch at or after ``step`` is still ahead and may change freely.
    """
    starts = (saved.train.finetune_from, current.train.finetune_from)
    if any(start is not None and start < step for start in starts):
        return frozenset(FINETUNE_KEYS)
    return frozenset()


def check_changes(
    changes: dict[str, tuple[Any, Any]],
    checkpoint: Path,
    *,
    allow: bool,
    locked: frozenset[str] = frozenset(),
) -> None:
    """Refuse changes a resume must not make silently (see :data:`ALLOWED_CHANGES`).

    Args:
        changes: key -> (saved, new), from :func:`config_changes`.
        checkpoint: the checkpoint resumed from (named in the message).
        allow: accept every change (``--allow-changes``).
        locked: allowed keys that this resume must not change anyway (:func:`finetune_locked`).

    Raises:
        ConfigError: one line listing every refused key as ``key: saved -> new``.
    """
    refused = sorted(key for key in changes if key not in ALLOWED_CHANGES or key in locked)
    if refused and not allow:
        listed = ", ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        why = ""
        if locked & set(refused):
            why = " (the dense fine-tune phase has begun or would begin before the checkpoint)"
        raise ConfigError(
            f"resuming {checkpoint} with changed settings ({listed}){why}; accept them with "
            "`tread train ... --allow-changes` (train(..., allow_changes=True)) "
            "or start a new train.run_dir"
        )


def record_changes(
    run_dir: Path, step: int, checkpoint: Path, changes: dict[str, tuple[Any, Any]]
) -> None:
    """Append the resume's changes to ``config_changes.jsonl`` (config.yaml holds the new one)."""
    if not changes:
        return
    row = {
        "step": step,
        "time": time.time(),
        "checkpoint": str(checkpoint),
        "changes": {key: list(values) for key, values in sorted(changes.items())},
    }
    with (run_dir / CHANGES_FILE).open("a") as file:
        file.write(json.dumps(row) + "\n")
