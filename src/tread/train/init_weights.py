"""``train.init_from``: where a new run's first weights come from, checked against the model.

A fresh run may start from the weights of another run's checkpoint, a run directory (its newest
checkpoint) or a single ``.safetensors`` file. Every check reads only the files' headers, so
``--dry-run`` (:func:`check_init_from`, on a meta-device model) costs no memory; a run's start
(:func:`init_from_weights`) makes the same checks, then loads model and EMA.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..models.backbone import unwrap
from . import checkpoint as ckpt
from .builders import build_from_config
from .state import RunState

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]  # cleaned state-dict key -> tensor shape


def init_from_weights(run: RunState) -> None:
    """Start a fresh run from the weights of ``train.init_from``: model and EMA from its files.

    Every rank loads the same files, as a resume does. The config records the checkpoint that
    was used (a run directory's newest one at this moment), so config.yaml stays exact.
    """
    value = run.config.train.init_from
    if value is None:
        return
    model_file, ema_file = init_weight_files(value, model_shapes(run.model))
    ckpt.load_weights(run.model, model_file)
    if ema_file == model_file:  # one file for both: read it once
        run.ema.load_state_dict(run.model.state_dict())
    else:
        ckpt.load_weights(run.ema, ema_file)
    used = str(model_file if model_file == ema_file else model_file.parent)
    if used != str(Path(value)):
        train = dataclasses.replace(run.config.train, init_from=used)
        run.config = dataclasses.replace(run.config, train=train)
    log.info(
        "train.init_from=%s: a new run at step 0, model weights from %s, EMA from %s",
        value,
        model_file,
        ema_file,
    )


def init_weight_files(value: str, expected: Shapes) -> tuple[Path, Path]:
    """The (model, EMA) weight files of ``train.init_from``, checked to fit a model.

    Only the files' headers are read (:func:`weight_shapes`).

    Args:
        value: the ``train.init_from`` setting.
        expected: the model's key -> shape (:func:`model_shapes`).

    Returns:
        (model file, EMA file); the same file twice for a single ``.safetensors`` file.

    Raises:
        ConfigError: one line naming ``train.init_from``, the path, and the first tensor that
            does not fit with both shapes.
    """
    where = f"train.init_from={value}"
    try:
        files = source_weight_files(value)
    except CheckpointError as err:
        raise ConfigError(
            f"{where}: {err}; expected a checkpoint directory, a run directory or a "
            ".safetensors file"
        ) from None
    for file in dict.fromkeys(files):  # a single file once
        try:
            problem = shapes_mismatch(weight_shapes(file), expected)
        except CheckpointError as err:
            raise ConfigError(f"{where}: {err}") from None
        if problem:
            in_file = "" if str(file) == str(Path(value)) else f" (in {file})"
            raise ConfigError(f"{where}: {problem}{in_file}")
    return files


def check_init_from(config: Config) -> tuple[Path, Path] | None:
    """The checks a run's start makes on ``train.init_from``, for ``--dry-run`` (writes nothing).

    The model is built on the meta device: shapes only, no memory and no initialisation.

    Args:
        config: a resolved config (:func:`~tread.train.builders.resolve_run`).

    Returns:
        The (model, EMA) files a fresh run would load; None when ``init_from`` is unset or the
        run would resume from its own checkpoint instead.

    Raises:
        ConfigError / CheckpointError: what the run would raise before writing anything.
    """
    value = config.train.init_from
    if value is None:
        return None
    resume_from = ckpt.resume_source(config, Path(config.train.run_dir))
    if resume_from is not None:
        log.info("train.init_from=%s ignored: the run resumes from %s", value, resume_from)
        return None
    with torch.device("meta"):
        model = build_from_config(config)
    return init_weight_files(value, model_shapes(model))


def weight_shapes(file: Path) -> Shapes:
    """Tensor shapes of a safetensors file, read from its header: no tensor is loaded.

    Args:
        file: a ``.safetensors`` file.

    Returns:
        Cleaned key (:func:`~tread.train.checkpoint.clean_key`) -> shape.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # a list: the handle itself is not iterable
            return {ckpt.clean_key(k): tuple(handle.get_slice(k).get_shape()) for k in names}
    except Exception as err:  # OSError, or safetensors' own errors for bad headers
        raise CheckpointError(f"cannot read weights {file}: {err}") from None


def model_shapes(module: nn.Module) -> Shapes:
    """Key -> shape of what ``module`` saves (works on the meta device: nothing is copied)."""
    return {ckpt.clean_key(k): tuple(v.shape) for k, v in unwrap(module).state_dict().items()}


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def shapes_mismatch(found: Shapes, expected: Shapes) -> str | None:
    """The first way a weight file's tensors do not fit a model, in one phrase, or None.

    Checked in this order: a tensor of the wrong shape, a tensor the file lacks, a tensor the
    model lacks (each names the tensor and the shapes; a count of the others of its kind).

    Args:
        found: the file's key -> shape (:func:`weight_shapes`).
        expected: the model's key -> shape (:func:`model_shapes`).
    """
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    extra = sorted(k for k in found if k not in expected)
    if wrong:
        key = wrong[0]
        text = (
            f"{key} has shape {_shape_text(found[key])}, "
            f"this model expects {_shape_text(expected[key])}"
        )
        return text + _more(len(wrong) - 1, "tensor(s) of another shape")
    if missing:
        key = missing[0]
        text = f"{key} is missing (this model expects shape {_shape_text(expected[key])})"
        return text + _more(len(missing) - 1, "missing")
    if extra:
        key = extra[0]
        text = f"{key} (shape {_shape_text(found[key])}) is not a tensor of this model"
        return text + _more(len(extra) - 1, "unknown to it")
    return None


def _more(count: int, what: str) -> str:
    return f"; {count} more {what}" if count else ""


def source_weight_files(path: str | Path) -> tuple[Path, Path]:
    """The (model, EMA) weight files of a source of weights for a new run.

    Args:
        path: a checkpoint directory, a run directory (then its newest complete checkpoint)
            or a single ``.safetensors`` file (then it serves as both).

    Raises:
        CheckpointError: the path does not exist, or is none of the three.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is a file but not a .safetensors file (nor a checkpoint directory)"
            )
        return path, path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    checkpoint = ckpt.resolve_checkpoint(path)
    return checkpoint / "model.safetensors", checkpoint / "ema.safetensors"
