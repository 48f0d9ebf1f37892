"""Checkpoints: safetensors weights + JSON config + torch-saved optimizer/loop state.

Layout of one checkpoint directory ``<run>/checkpoints/step_XXXXXXX/``::

    model.safetensors   training weights
    ema.safetensors     EMA weights (what sampling uses)
    state.pt            optimizer, step, data-stream position, seed (tensors and ints only)
    config.json         the resolved run config
    meta.json           step, time, files; written last: its presence marks a complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, so a crash mid-write
never leaves a half checkpoint under a valid name and never touches the previous ones.
"""

from __future__ import annotations

import json
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

_STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DDP ``module.``, compile ``_orig_mod.``) and make tensors owned."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value.detach().contiguous().cpu()
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


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
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(clean_state_dict(unwrap(model).state_dict()), str(tmp / "model.safetensors"))
    save_file(clean_state_dict(unwrap(ema).state_dict()), str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "loop": loop_state}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    meta = {"step": step, "time": time.time(), "format": "tread-checkpoint-1"}
    (tmp / "meta.json").write_text(json.dumps(meta))
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a run directory (then its newest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path} (expected checkpoints/step_*/)")
    return found[-1]


def read_config(checkpoint: Path) -> Config:
    file = checkpoint / "config.json"
    try:
        return config_from_dict(json.loads(file.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint config {file} is unreadable: {err}") from None
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config {file} is invalid: {err}") from None


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into ``module`` strictly; any problem names the file."""
    try:
        state = load_file(str(file))
    except Exception as err:  # OSError, or safetensors' own errors for truncated/bad headers
        raise CheckpointError(f"cannot read weights {file}: {err}") from None
    try:
        unwrap(module).load_state_dict(clean_state_dict(state))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"weights {file} do not fit the model: {first}") from None


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    file = checkpoint / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training state {file}: {err}") from None


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
    meta = json.loads((checkpoint / "meta.json").read_text())
    return model.to(device).eval(), config, int(meta["step"])
