"""Checkpoints: safetensors weights + JSON config + torch-saved optimizer/loop state.

Layout of one checkpoint directory ``<run>/checkpoints/step_XXXXXXX/``::

    model.safetensors   training weights
    ema.safetensors     EMA weights (what sampling uses)
    state.pt            optimizer, step, data-stream position, seed (tensors and ints only)
    config.json         the resolved run config
    meta.json           step, time, files; written last: its presence marks a complete checkpoint

A ``train.parallel: fsdp`` run adds ``sharded/`` (torch.distributed.checkpoint: model, EMA and
optimizer state, one file per rank) and keeps only the loop state in state.pt; its two
safetensors files hold the full weights gathered on rank 0, so inference reads every checkpoint
alike (see :mod:`tread.train.fsdp`).

A checkpoint is written into a temporary directory and renamed into place, so a crash mid-write
never leaves a half checkpoint under a valid name and never touches the previous ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config, config_from_dict, config_to_dict
from ..errors import CheckpointError, ConfigError
from ..models.backbone import unwrap

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
# Left behind by a process killed inside save_checkpoint: .tmp_step_<step>_<pid> (being written)
# and .old_step_<step>_<pid> (the previous copy of a re-saved step, renamed aside).
_PARTIAL_DIR = re.compile(r"^\.(tmp|old)_step_(\d+)_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
SHARDED_DIR = "sharded"  # FSDP checkpoints: torch.distributed.checkpoint files of every rank
CHECKPOINT_FILES = (*WEIGHT_FILES, "state.pt", "config.json", "meta.json", SHARDED_DIR)


def clean_key(key: str) -> str:
    """A state-dict key without wrapper prefixes (DDP ``module.``, compile ``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (see :func:`clean_key`) and make tensors owned."""
    return {clean_key(key): value.detach().contiguous().cpu() for key, value in state.items()}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete temporary dirs are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    loop_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep_last``.

    Returns:
        The final checkpoint directory.
    """
    tmp = begin_checkpoint(run_dir, step)
    weights = clean_state_dict(unwrap(model).state_dict())
    ema_weights = clean_state_dict(unwrap(ema).state_dict())
    training_state = {"optimizer": optimizer.state_dict(), "loop": loop_state}
    write_checkpoint_files(tmp, weights, ema_weights, training_state)
    return finish_checkpoint(tmp, run_dir, step, config=config, keep_last=keep_last)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A new, empty temporary directory for the checkpoint of ``step`` (named after this pid).

    Args:
        run_dir: the run directory.
        step: the step being saved.

    Returns:
        ``<run>/checkpoints/.tmp_step_XXXXXXX_<pid>``.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_checkpoint_files(
    tmp: Path,
    weights: Mapping[str, torch.Tensor],
    ema_weights: Mapping[str, torch.Tensor],
    training_state: dict[str, Any],
) -> None:
    """The weight files and state.pt of a checkpoint being written into ``tmp``.

    Args:
        tmp: the directory of :func:`begin_checkpoint`.
        weights: the model's full state dict (clean keys, CPU tensors).
        ema_weights: the EMA's, likewise.
        training_state: what state.pt holds (``loop``; ``optimizer`` unless sharded).
    """
    save_file(dict(weights), str(tmp / "model.safetensors"))
    save_file(dict(ema_weights), str(tmp / "ema.safetensors"))
    torch.save(training_state, tmp / "state.pt")


def finish_checkpoint(
    tmp: Path,
    run_dir: str | Path,
    step: int,
    *,
    config: Config,
    keep_last: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Complete ``tmp`` (config.json, then meta.json last), rename it into place and rotate.

    Args:
        tmp: the directory of :func:`begin_checkpoint`, holding every other file.
        run_dir: the run directory.
        step: the step saved.
        config: the resolved run config.
        keep_last: how many checkpoints to keep (the oldest others are deleted).
        meta: extra meta.json fields (an FSDP checkpoint's parallel mode and world size).

    Returns:
        The final checkpoint directory ``<run>/checkpoints/step_XXXXXXX``.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    (tmp / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    fields = {"step": step, "time": time.time(), "format": "tread-checkpoint-1", **(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(fields))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
        old = root / f".old_step_{step:07d}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint holds FSDP shards (``sharded/``), the source a resume reads."""
    return (Path(checkpoint) / SHARDED_DIR).is_dir()


def _fsync_dir(path: Path) -> None:
    for file in [path, *path.iterdir()] if path.is_dir() else [path]:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def remove_stale_partials(run_dir: str | Path) -> list[Path]:
    """Clean up after processes killed inside :func:`save_checkpoint`; call with the run locked.

    Removes the ``.tmp_step_*_<pid>`` directories of processes that are gone (and of this pid:
    a container restarted under the same pid cannot be writing yet). A ``.old_step_*`` whose
    ``step_*`` is missing (killed between the two renames) is the last whole copy of that step:
    it is put back, not deleted.

    Returns:
        The directories removed or restored.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    handled = []
    for path in sorted(root.iterdir()):
        match = _PARTIAL_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        kind, step, pid = match.group(1), int(match.group(2)), int(match.group(3))
        if pid != os.getpid() and _pid_alive(pid):
            log.info("leaving %s: process %d is still running", path, pid)
            continue
        final = root / f"step_{step:07d}"
        if kind == "old" and not final.exists() and (path / "meta.json").is_file():
            path.rename(final)
            log.warning("restored checkpoint %s from an interrupted save", final)
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a killed process", path)
        handled.append(path)
    return handled


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a run directory (then its newest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _STEP_DIR.match(path.name) or any((path / name).exists() for name in CHECKPOINT_FILES):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {path / 'meta.json'} is missing "
            "(written last, so the save was interrupted)"
        )
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path} (expected checkpoints/step_*/)")
    return found[-1]


def resume_source(config: Config, run_dir: Path) -> Path | None:
    """The checkpoint a run starts from under ``train.resume`` (None = fresh start).

    Raises:
        ConfigError: ``resume: none`` but ``run_dir`` already holds checkpoints.
        CheckpointError: an explicit ``resume`` path holds no complete checkpoint.
    """
    existing = list_checkpoints(run_dir)
    resume = config.train.resume
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise ConfigError(
                f"train.run_dir={run_dir} already holds checkpoints; resume with "
                "train.resume=auto or choose a new train.run_dir (nothing was overwritten)"
            )
        return None
    return resolve_checkpoint(resume)


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {what} {file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {what} {file} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"checkpoint {what} {file} is not a JSON object (found {type(data).__name__})"
        )
    return data


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, checked to hold an integer ``step`` >= 0."""
    file = checkpoint / "meta.json"
    meta = _read_json_object(file, "meta")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint meta {file} has no valid 'step' (found {step!r})")
    return meta


def read_config(checkpoint: Path) -> Config:
    file = checkpoint / "config.json"
    data = _read_json_object(file, "config")
    try:
        return config_from_dict(data)
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint config {file} is invalid: {err}") from None


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into ``module`` strictly; any problem names the file."""
    try:
        state = load_file(str(file))
    except Exception as err:  # OSError, or safetensors' own errors for truncated/bad headers
        raise CheckpointError(f"cannot read weights {file}: {err}") from None
    target = unwrap(module)
    try:
        if _is_sharded(target):  # FSDP2: every rank reads the full file and keeps its shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(target, clean_state_dict(state), options=full)
        else:
            target.load_state_dict(clean_state_dict(state))
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"weights {file} do not fit the model: {first}") from None


def _is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are DTensors (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer and loop state of a checkpoint, checked for the keys a resume needs."""
    file = checkpoint / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is missing its training state {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read training state {file}: {err}") from None
    except Exception:  # pickle, zip or torch errors: all mean "not what tread writes"
        # torch's own message suggests weights_only=False, i.e. running pickled code: never.
        raise CheckpointError(
            f"{file} is not a tread training state (unreadable or written by something else)"
        ) from None
    problem = _training_state_problem(state, sharded=is_sharded_checkpoint(checkpoint))
    if problem:
        raise CheckpointError(f"training state {file} is incomplete: {problem}")
    return state


def _training_state_problem(state: Any, *, sharded: bool = False) -> str | None:
    """What a resume would trip over in a loaded state.pt, or None.

    ``sharded``: the checkpoint keeps its optimizer state in ``sharded/``, not in state.pt.
    """
    if not isinstance(state, dict):
        return f"expected a dict, found {type(state).__name__}"
    optimizer, loop = state.get("optimizer"), state.get("loop")
    has_optimizer = isinstance(optimizer, dict) and {"state", "param_groups"} <= optimizer.keys()
    if not sharded and not has_optimizer:
        return "no optimizer state"
    if not isinstance(loop, dict):
        return "no loop state"
    if not isinstance(loop.get("step"), int) or loop["step"] < 0:
        return f"loop step is {loop.get('step')!r}, not an int >= 0"
    if not isinstance(loop.get("data"), dict):
        return "no data-stream position (loop.data)"
    return None


def load_for_inference(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Config, int]:
    """The EMA model of a checkpoint (or of a run's newest checkpoint), ready for sampling.

    Returns:
        (ema model in eval mode on ``device``, its config, its step).
    """
    from .builders import build_from_config  # local: builders imports data/models

    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    model = build_from_config(config)
    load_weights(model, checkpoint / "ema.safetensors")
    step = read_meta(checkpoint)["step"]
    return model.to(device).eval(), config, step
