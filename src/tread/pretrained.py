"""Published DiT / SiT checkpoints -> tread's DiT (DiT: Peebles & Xie 2023; SiT: Ma et al. 2024).

The official releases (facebookresearch/DiT ``DiT-XL-2-256x256.pt`` / ``-512x512.pt``,
willisma/SiT ``SiT-XL-2-256x256.pt``) are raw ``torch.save`` state dicts; their training
scripts save ``{"model", "ema", "opt", "args"}``, of which the EMA weights are the ones to use.
SiT's module tree is DiT's, so one key map serves both. The map, official -> tread:

    x_embedder.proj.{weight,bias}            -> patch_embed.proj.*
    t_embedder.mlp.{0,2}.*                   -> t_embedder.mlp.{0,2}.*
    y_embedder.embedding_table.weight        -> y_embedder.table.weight  (last row: null label)
    blocks.i.attn.{qkv,proj}.*               -> blocks.i.attn.{qkv,proj}.*
    blocks.i.mlp.{fc1,fc2}.*                 -> blocks.i.mlp.{fc1,fc2}.*
    blocks.i.adaLN_modulation.1.*            -> blocks.i.ada_ln_modulation.1.*
    final_layer.linear.*                     -> final_layer.linear.*
    final_layer.adaLN_modulation.1.*         -> final_layer.ada_ln_modulation.1.*
    pos_embed (1, N, D)                      -> checked against our fixed sin-cos, not stored

Everything else lines up without change: adaLN chunk order (shift, scale, gate for attention,
then for the MLP; shift, scale in the final layer), the (3, heads, D/heads) split of ``qkv``,
tanh-GELU, the timestep features (cos then sin, 256 channels, max period 10000) and the
unpatchify order. Learned-sigma checkpoints keep their 2C output channels; tread's objectives
use the first C (:func:`tread.transport.types.prediction_channels`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import CheckpointError, ConfigError
from .models.dit import DiT, DiTConfig
from .models.layers import sincos_2d
from .models.registry import MODEL_CONFIGS, build_model

# Official module names that differ from ours, one dotted segment each; every other segment is
# the same in both layouts.
_OFFICIAL_TO_TREAD = {
    "x_embedder": "patch_embed",
    "embedding_table": "table",
    "adaLN_modulation": "ada_ln_modulation",
}
_TREAD_TO_OFFICIAL = {new: old for old, new in _OFFICIAL_TO_TREAD.items()}
_OFFICIAL_MARKER = "x_embedder.proj.weight"
_TREAD_MARKER = "patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_SHOWN = 3  # keys named in a missing/unknown-keys error


@dataclass(frozen=True)
class Converted:
    """A checkpoint in tread's key layout, with the architecture it fits.

    Attributes:
        state: tread state dict (``DiT.state_dict()`` keys; no ``pos_embed``: ours is fixed).
        config: the DiT config the weights fit (registry entry + inferred shapes + overrides).
        name: the registry name the weights were checked against.
        source: the original file name.
    """

    state: dict[str, Tensor]
    config: DiTConfig
    name: str
    source: str

    @property
    def num_params(self) -> int:
        return sum(tensor.numel() for tensor in self.state.values())


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` wrote: the file, and the config its weights fit."""

    path: Path
    name: str
    num_params: int
    config: DiTConfig
    source: str


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a state dict from a ``.pt`` / ``.pth`` / ``.safetensors`` file.

    A training checkpoint (a dict with ``"ema"`` or ``"model"``) yields its EMA weights (else
    its model weights); DDP / compile key prefixes are stripped.

    Args:
        path: the checkpoint file.

    Returns:
        ``(state, metadata)``: tensors by key, and the safetensors header metadata ({} for .pt).

    Raises:
        CheckpointError: a missing file, or one that holds no state dict; names the file.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"pretrained: checkpoint {file} not found")
    if file.suffix == ".safetensors":
        state, metadata = _read_safetensors(file)
    else:
        state, metadata = _unwrap(_torch_load(file), file), {}
    from .train.checkpoint import clean_state_dict  # lazy: keeps `import tread` light

    return clean_state_dict(state), metadata


def _read_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # OSError, or safetensors' own errors for a bad header
        raise CheckpointError(f"pretrained: {file} is not a safetensors file: {err}") from None
    return state, metadata


def _torch_load(file: Path) -> Any:
    """``torch.load`` with ``weights_only``: tensors and plain containers, never pickled code.

    The official training scripts also pickle their ``argparse.Namespace`` under ``"args"``:
    a plain attribute bag, so it is allowed. ``mmap`` keeps a 10 GB training checkpoint (model,
    EMA, optimizer) out of memory except for the tensors read; files in the legacy (pre-zip)
    format cannot be mapped and are read whole.
    """
    problem = ""
    with _allow_globals([argparse.Namespace]):
        for mmap in (True, False):
            try:
                return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            except OSError as err:
                raise CheckpointError(f"pretrained: cannot read {file}: {err}") from None
            except Exception as err:  # pickle, zip or torch errors: not a weights-only checkpoint
                problem = type(err).__name__
    # torch's own message suggests weights_only=False, i.e. running pickled code: never.
    raise CheckpointError(
        f"pretrained: {file} is not a PyTorch checkpoint that loads with weights_only ({problem})"
    )


def _allow_globals(types: list[type]) -> contextlib.AbstractContextManager[Any]:
    """Allow ``types`` in weights-only loads: scoped on torch >= 2.5, process-wide on 2.4."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(types)
    torch.serialization.add_safe_globals(types)
    return contextlib.nullcontext()


def _unwrap(obj: Any, file: Path) -> dict[str, Tensor]:
    """The state dict inside a loaded ``.pt``: itself, or its ``"ema"`` (else ``"model"``)."""
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"pretrained: {file} holds no state dict (found {type(obj).__name__})"
        )
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"pretrained: {file} is not a state dict: entries {_first(bad)} are not named tensors"
        )
    return dict(obj)


def tread_key(official: str) -> str:
    """Rename one official DiT/SiT state-dict key to tread's (``adaLN_modulation`` ->
    ``ada_ln_modulation``, ...); keys whose names agree come back unchanged."""
    return ".".join(_OFFICIAL_TO_TREAD.get(part, part) for part in official.split("."))


def official_key(tread: str) -> str:
    """The official name of a tread DiT state-dict key (inverse of :func:`tread_key`)."""
    return ".".join(_TREAD_TO_OFFICIAL.get(part, part) for part in tread.split("."))


def check_pos_embed(pos_embed: Tensor, width: int, source: str) -> int:
    """Check an official ``pos_embed`` is the fixed 2-D sin-cos tread rebuilds; return its grid.

    Args:
        pos_embed: (1, N, D) from the checkpoint.
        width: D of the patch embedding.
        source: file name for messages.

    Returns:
        Tokens per side, sqrt(N).

    Raises:
        CheckpointError: wrong shape, or values that are not our sin-cos.
    """
    shape = tuple(pos_embed.shape)
    grid = math.isqrt(shape[1]) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != 1 or shape[2] != width or grid * grid != shape[1]:
        raise CheckpointError(
            f"pretrained: pos_embed has shape {shape}, expected (1, grid*grid, {width}) "
            f"(in {source})"
        )
    expected = sincos_2d(width, grid)  # (N, D)
    found = pos_embed[0].float()  # (1, N, D) -> (N, D)
    # Stored in float32 in the releases; allow the rounding of a half-precision copy.
    tolerance = 4 * torch.finfo(pos_embed.dtype).eps if pos_embed.is_floating_point() else 0.0
    error = (found - expected).abs().max().item()
    if not error <= tolerance:
        raise CheckpointError(
            f"pretrained: pos_embed is not the fixed 2-D sin-cos embedding of a {grid}x{grid} "
            f"grid of width {width} (max difference {error:.3g}; in {source})"
        )
    return grid


def _shape_defaults(
    state: Mapping[str, Tensor], official: bool, metadata: Mapping[str, str], source: str
) -> dict[str, Any]:
    """``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma`` read off the tensors.

    ``state`` is in tread's layout; for an official checkpoint the grid comes from its
    ``pos_embed``, for a converted one from the safetensors metadata.
    """
    patch_weight = state[_TREAD_MARKER]  # (D, C, p, p)
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        key = _OFFICIAL_MARKER if official else _TREAD_MARKER
        raise CheckpointError(
            f"pretrained: {key} has shape {tuple(patch_weight.shape)}, expected "
            f"(width, channels, patch, patch) (in {source})"
        )
    width, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    out: dict[str, Any] = {"in_channels": in_channels}
    table = state.get("y_embedder.table.weight")
    if table is not None:
        out["num_classes"] = table.shape[0] - 1  # the last row is the null (guidance) label
    head = state.get("final_layer.linear.weight")  # (p*p*C_out, D)
    if head is not None:
        out["learn_sigma"] = head.shape[0] == 2 * patch * patch * in_channels
    if official:
        if "pos_embed" not in state:
            raise CheckpointError(f"pretrained: {source} has no pos_embed")
        out["input_size"] = check_pos_embed(state["pos_embed"], width, source) * patch
    elif metadata.get("input_size", "").isdigit():
        out["input_size"] = int(metadata["input_size"])
    return out


def convert_state_dict(
    state: Mapping[str, Tensor],
    name: str,
    *,
    metadata: Mapping[str, str] | None = None,
    source: str = "state dict",
    **overrides: Any,
) -> Converted:
    """Map an official DiT/SiT state dict (or a tread one) onto ``build_model(name)``.

    Args:
        state: official layout (``x_embedder.*``, ``pos_embed``, ...) or tread's.
        name: a DiT-family registry name, e.g. ``"DiT-XL/2"`` or ``"SiT-XL/2"``.
        metadata: safetensors header of a converted file (its ``input_size``).
        source: file name for messages.
        **overrides: architecture fields for ``build_model``; ``input_size``, ``in_channels``,
            ``num_classes`` and ``learn_sigma`` default to what the tensors say. A different
            ``input_size`` is allowed (positions are fixed sin-cos, not weights).

    Returns:
        The tread state dict and the config it fits.

    Raises:
        ConfigError: ``name`` is not a DiT-family entry, or the overrides are invalid.
        CheckpointError: a tensor of the wrong shape, missing or unknown keys, a different
            depth, or a ``pos_embed`` that is not the fixed sin-cos; names the key and shapes.
    """
    entry = MODEL_CONFIGS.get(name)
    if not isinstance(entry, DiTConfig):
        dits = ", ".join(k for k, v in MODEL_CONFIGS.items() if isinstance(v, DiTConfig))
        raise ConfigError(
            f"pretrained: model {name!r} is not a DiT/SiT entry; choose one of {dits}"
        )
    official = _OFFICIAL_MARKER in state
    if not official and _TREAD_MARKER not in state:
        raise CheckpointError(
            f"pretrained: {source} is not a DiT/SiT state dict (no {_OFFICIAL_MARKER} or "
            f"{_TREAD_MARKER}; first keys: {_first(state)})"
        )
    renamed = {tread_key(key): value for key, value in state.items()} if official else dict(state)
    options = {**_shape_defaults(renamed, official, metadata or {}, source), **overrides}
    renamed.pop("pos_embed", None)  # checked above; tread rebuilds it for any input size
    if "input_size" not in options:
        raise CheckpointError(
            f"pretrained: {source} does not record its input_size (no pos_embed, no "
            "'input_size' metadata); pass input_size="
        )
    config = _config(entry, name, options)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {key: value.shape for key, value in config.build().state_dict().items()}
    _check_keys(renamed, expected, name, source, official)
    return Converted(state=renamed, config=config, name=name, source=source)


def _config(entry: DiTConfig, name: str, options: Mapping[str, Any]) -> DiTConfig:
    fields = {field.name for field in dataclasses.fields(entry)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"pretrained: unknown option(s) {', '.join(unknown)} for {name}; "
            f"valid: {', '.join(sorted(fields))}"
        )
    try:
        return dataclasses.replace(entry, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pretrained: {name}: {err}") from None


def _check_keys(
    state: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size],
    name: str,
    source: str,
    official: bool,
) -> None:
    """Refuse the first mismatch: a shape, then the depth, then missing / unknown keys."""

    def shown(key: str) -> str:  # a key as the user's file spells it
        return official_key(key) if official else key

    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            raise CheckpointError(
                f"pretrained: {shown(key)} has shape {tuple(state[key].shape)}, {name} expects "
                f"{tuple(shape)} (in {source})"
            )
    depth, found_depth = _depth(expected), _depth(state)
    if depth != found_depth:
        raise CheckpointError(
            f"pretrained: {source} has {found_depth} blocks, {name} has {depth} "
            "(pass depth= for a custom depth)"
        )
    missing = [shown(key) for key in expected if key not in state]
    if missing:
        raise CheckpointError(
            f"pretrained: {source} lacks {len(missing)} key(s) {name} needs: {_first(missing)}"
        )
    unknown = [shown(key) for key in state if key not in expected]
    if unknown:
        raise CheckpointError(
            f"pretrained: {source} has {len(unknown)} key(s) {name} does not: {_first(unknown)}"
        )


def _depth(keys: Any) -> int:
    """Blocks in a state dict: 1 + the highest ``blocks.<i>.`` index (0 if none)."""
    found = [int(m.group(1)) for key in keys if (m := _BLOCK_KEY.match(key))]
    return max(found) + 1 if found else 0


def _first(keys: Any) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def read_converted(path: str | Path, name: str, **overrides: Any) -> Converted:
    """Read a checkpoint file and map it onto ``name`` (see :func:`convert_state_dict`).

    Args:
        path: ``.pt`` / ``.pth`` (raw state dict or training checkpoint) or ``.safetensors``
            (official layout, or tread's as written by :func:`convert_checkpoint`).
        name: a DiT-family registry name.
        **overrides: architecture fields (see :func:`convert_state_dict`).

    Returns:
        The converted weights and their config.
    """
    file = Path(path)
    state, metadata = read_checkpoint(file)
    return convert_state_dict(state, name, metadata=metadata, source=file.name, **overrides)


def load_pretrained(path: str | Path, name: str, **overrides: Any) -> DiT:
    """Build ``name`` with a published DiT/SiT checkpoint's weights (or a converted file's).

    ``input_size``, ``in_channels``, ``num_classes`` and ``learn_sigma`` are taken from the
    checkpoint unless overridden; build options (``routes``, ``keep_order``,
    ``fp32_after_reinsert``) pass through to :func:`tread.build_model`.

    Args:
        path: ``DiT-XL-2-256x256.pt``, ``SiT-XL-2-256x256.pt``, a training checkpoint of those
            repositories (its EMA weights are used), or a ``.safetensors`` from
            :func:`convert_checkpoint`.
        name: a DiT-family registry name, e.g. ``"DiT-XL/2"``.
        **overrides: architecture fields and build options.

    Returns:
        The model in eval mode, its outputs (B, 2C, H, W) for a learned-sigma checkpoint.

    Raises:
        CheckpointError / ConfigError: one line naming the file, key or value.
    """
    build = {
        key: overrides.pop(key)
        for key in ("routes", "keep_order", "fp32_after_reinsert")
        if key in overrides
    }
    converted = read_converted(path, name, **overrides)
    arch = dataclasses.asdict(converted.config)  # registry entry + inferred shapes + overrides
    model = build_model(name, **arch, **build)
    model.load_state_dict(converted.state)  # keys and shapes were checked: strict load cannot fail
    return model.eval()


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    name: str,
    *,
    overwrite: bool = False,
    **overrides: Any,
) -> ConvertResult:
    """Convert a published DiT/SiT checkpoint into one ``.safetensors`` in tread's key layout.

    The file holds exactly ``DiT.state_dict()`` for the checked config (so ``train.init_from``
    and :func:`load_pretrained` take it) and header metadata ``tread_model``, ``learn_sigma``,
    ``input_size`` and ``source``. It is written to a temporary file and renamed into place.

    Args:
        src: the official checkpoint (see :func:`load_pretrained`).
        out: the ``.safetensors`` to write.
        name: a DiT-family registry name.
        overwrite: replace an existing ``out`` instead of refusing.
        **overrides: architecture fields (see :func:`convert_state_dict`).

    Returns:
        What was written.

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``) or is not ``.safetensors``.
        CheckpointError: an unreadable or incompatible ``src``.
    """
    target = Path(out)
    if target.suffix != ".safetensors":
        raise ConfigError(f"convert: output {target} must end in .safetensors")
    if target.exists() and not overwrite:
        raise ConfigError(f"convert: {target} exists; pass --overwrite to replace it")
    converted = read_converted(src, name, **overrides)
    config = converted.config
    metadata = {
        "tread_model": name,
        "learn_sigma": str(config.learn_sigma).lower(),
        "input_size": str(config.input_size),
        "source": converted.source,
    }
    _save_atomic(converted.state, target, metadata)
    return ConvertResult(target, name, converted.num_params, config, converted.source)


def _save_atomic(state: Mapping[str, Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file beside ``target`` and rename it over: never a half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        tensors = {key: value.contiguous() for key, value in state.items()}
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "ConvertResult",
    "Converted",
    "check_pos_embed",
    "convert_checkpoint",
    "convert_state_dict",
    "load_pretrained",
    "official_key",
    "read_checkpoint",
    "read_converted",
    "tread_key",
]
