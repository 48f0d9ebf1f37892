"""Precomputed autoencoder latents, kept unnormalised: single files (``.npy`` / ``.npz`` /
``.safetensors``, read whole) and shard directories (streamed), with the shard writer.

A shard directory holds ``latents_00000.npy`` (n, C, H, W) float16/float32 and
``labels_00000.npy`` (n,) int64 per shard, and ``index.json``, the manifest, written last: a
directory with a manifest is complete. While ``tread encode-latents`` fills one, it holds
``encode.partial.json`` instead (its settings), which lets an interrupted encode resume.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from tread.data.arrays import (
    MAX_CLASSES,
    ImageArrays,
    ShardedArray,
    classes_from_labels,
    npy_header,
)
from tread.errors import ConfigError, DataError
from tread.paths import atomic_open

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "LATENT_SUFFIXES",
    "MANIFEST_NAME",
    "PARTIAL_NAME",
    "finish_shard_dir",
    "load_latent_shards",
    "load_latents",
    "prepare_shard_dir",
    "read_manifest",
    "shard_rows",
    "write_shard",
]

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
MANIFEST_NAME = "index.json"
PARTIAL_NAME = "encode.partial.json"
SHARD_FORMAT = "tread-latent-shards"
SHARD_VERSION = 1
DEFAULT_SHARD_SIZE = 50_000  # images per shard: 410 MB of 4x32x32 float16 (ImageNet: 26 shards)
# Every file an encode writes, and its temporary name (``.{name}.{pid}.{hex}.tmp``, see
# tread.paths.temporary_name); nothing else in an output directory is ever deleted.
_OURS = re.compile(
    r"\.?(latents_\d{5,}\.npy|labels_\d{5,}\.npy|index\.json|encode\.partial\.json)(\..+\.tmp)?"
)

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


# --- shard directories: reading ----------------------------------------------------------------


def _shard_names(k: int) -> tuple[str, str]:
    return f"latents_{k:05d}.npy", f"labels_{k:05d}.npy"


def _plain_shard_entry(entry: Any) -> bool:
    """``{latents: name, labels: name, count: n > 0}`` with plain file names (no paths)."""
    if not isinstance(entry, dict) or type(entry.get("count")) is not int or entry["count"] < 1:
        return False
    names = [entry.get("latents"), entry.get("labels")]
    return all(isinstance(f, str) and Path(f).name == f and f[:1] not in ("", ".") for f in names)


# Manifest fields: (test, what is expected). Types are exact: JSON true is not a count.
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == SHARD_FORMAT, repr(SHARD_FORMAT)),
    "version": (
        lambda v: type(v) is int and 1 <= v <= SHARD_VERSION,
        f"1..{SHARD_VERSION} (written by a newer tread?)",
    ),
    "shape": (
        lambda v: isinstance(v, list) and len(v) == 3 and all(type(d) is int and d > 0 for d in v),
        "[C, H, W] of positive ints",
    ),
    "dtype": (lambda v: v in ("float16", "float32"), "float16 or float32"),
    "num_classes": (
        lambda v: v is None or (type(v) is int and 1 <= v <= MAX_CLASSES),
        f"null or an int in [1, {MAX_CLASSES}]",
    ),
    "scale_factor": (
        lambda v: v is None or (type(v) in (int, float) and math.isfinite(v) and v != 0),
        "null or a finite non-zero number",
    ),
    "shards": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
}


def read_manifest(directory: str | Path, name: str = "latents") -> dict[str, Any]:
    """Read and check a shard directory's ``index.json`` (no shard is opened).

    Args:
        directory: the shard directory.
        name: dataset name for messages.

    Returns:
        The manifest: ``format``, ``version``, ``num_samples``, ``shape`` [C, H, W], ``dtype``,
        ``num_classes``, ``scale_factor`` and ``shards`` (``latents``, ``labels``, ``count``
        each), plus the encode settings (``resolution``, ``vae``, ``hflip``, ...).

    Raises:
        DataError: the manifest is missing, not JSON, of another format or a newer version, or
            a field is malformed; the message names the file and the field.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        partial = (Path(directory) / PARTIAL_NAME).is_file()
        hint = "an interrupted encode: run the same tread encode-latents again to finish it"
        raise DataError(f"{name}: {path} not found" + (f" ({hint})" if partial else ""))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{name}: cannot read {path} as JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{name}: {path} must hold a JSON object, got {type(manifest).__name__}")
    for key, (test, wanted) in _MANIFEST_FIELDS.items():
        if not test(manifest.get(key)):
            raise DataError(f"{name}: {path}: {key}={manifest.get(key)!r}, expected {wanted}")
    for k, entry in enumerate(manifest["shards"]):
        if not _plain_shard_entry(entry):
            raise DataError(
                f"{name}: {path}: shards[{k}]={entry!r}, expected "
                "{latents: file name, labels: file name, count: n > 0}"
            )
    total = sum(entry["count"] for entry in manifest["shards"])
    if manifest.get("num_samples") != total:
        raise DataError(
            f"{name}: {path}: num_samples={manifest.get('num_samples')!r}, but the shards hold "
            f"{total}"
        )
    return manifest


def _read_shard_labels(path: Path, count: int, classes: int | None, name: str) -> np.ndarray:
    """(count,) int64 labels of one shard, checked against ``classes`` (None: only >= 0)."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{name}: cannot read {path} as .npy: {err}") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name}: {path} labels must be 1-D integers, got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != count:
        raise DataError(f"{name}: {path} has {labels.shape[0]} labels, the index says {count}")
    classes_from_labels(torch.from_numpy(labels.astype(np.int64)), classes, path, name)
    return labels.astype(np.int64)


def load_latent_shards(
    directory: str | Path,
    scale_factor: float | None = None,  # None: the manifest's scale_factor, else 1
    num_classes: int | None = None,  # None: the manifest's, else max label + 1
    name: str = "latents",
) -> ImageArrays:
    """Open a shard directory for streaming: reads the manifest and the labels, nothing else.

    Batches are read by ``ImageArrays.take`` from memory-mapped shards (see
    :class:`~tread.data.arrays.ShardedArray`), so memory per process stays about one batch
    whatever the dataset size.

    Args:
        directory: a directory written by ``tread encode-latents`` (or laid out alike).
        scale_factor: multiplier applied per batch; overrides the manifest's.
        num_classes: number of classes; labels must be below it.
        name: dataset name for messages and ``ImageArrays.name``.

    Returns:
        ImageArrays with ``latent=True`` whose ``images`` is a ShardedArray.

    Raises:
        DataError: a bad manifest, a missing shard, or a shard whose count, shape, dtype or
            labels disagree with the manifest; the message names the file.
        ConfigError: a zero or non-finite scale factor.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, name)
    entries = manifest["shards"]
    files = [directory / entry["latents"] for entry in entries]
    for path in files + [directory / entry["labels"] for entry in entries]:
        if not path.is_file():
            raise DataError(f"{name}: shard file missing: {path} (listed in {MANIFEST_NAME})")
    latents = ShardedArray(files, name)
    shape, dtype = tuple(manifest["shape"]), manifest["dtype"]
    for path, entry, count in zip(files, entries, latents.counts, strict=True):
        if count != entry["count"]:
            raise DataError(
                f"{name}: {path} holds {count} rows, {MANIFEST_NAME} says {entry['count']}"
            )
    if latents.shape[1:] != shape or latents.dtype != np.dtype(dtype):
        raise DataError(
            f"{name}: {files[0]} holds {latents.dtype} {latents.shape[1:]} latents, "
            f"{MANIFEST_NAME} says {dtype} {shape}"
        )
    classes = num_classes if num_classes is not None else manifest["num_classes"]
    labels = np.concatenate(
        [
            _read_shard_labels(directory / entry["labels"], entry["count"], classes, name)
            for entry in entries
        ]
    )
    label_t = torch.from_numpy(labels)  # (N,) int64
    classes = classes_from_labels(label_t, classes, directory, name)
    stored = manifest["scale_factor"]
    scale = float(scale_factor if scale_factor is not None else stored or 1.0)
    if not np.isfinite(scale) or scale == 0:
        raise ConfigError(
            f"{name}: scale factor (data.latent_scale) must be finite and non-zero, got {scale}"
        )
    return ImageArrays(
        images=latents, labels=label_t, num_classes=classes, name=name, latent=True, scale=scale
    )


# --- shard directories: writing ----------------------------------------------------------------


def shard_rows(settings: dict[str, Any], k: int) -> int:
    """Rows of shard ``k``: its images, twice that with hflip (each shard: images, mirrors)."""
    size, total = settings["shard_size"], settings["num_images"]
    images = min(size, total - k * size)
    return images * (2 if settings["hflip"] else 1)


def _num_shards(settings: dict[str, Any]) -> int:
    return -(-settings["num_images"] // settings["shard_size"])  # ceil


def _shard_complete(out: Path, settings: dict[str, Any], k: int) -> bool:
    """Both files of shard ``k`` are there with the rows, shape and dtype the settings ask for."""
    rows = shard_rows(settings, k)
    latents, labels = (out / n for n in _shard_names(k))
    if not (latents.is_file() and labels.is_file()):
        return False
    try:
        lat_shape, lat_dtype, _ = npy_header(latents, "encode-latents")
        lab_shape, lab_dtype, _ = npy_header(labels, "encode-latents")
    except DataError:
        return False  # unreadable: encode it again
    return (
        lat_shape == (rows, *settings["shape"])
        and lat_dtype == np.dtype(settings["dtype"])
        and lab_shape == (rows,)
        and lab_dtype == np.int64
    )


def _remove_ours(out: Path, temporary_only: bool = False) -> None:
    """Delete an encode's files, manifest first (a half-deleted set never looks complete)."""
    if not temporary_only:
        for path in (out / MANIFEST_NAME, out / PARTIAL_NAME):
            path.unlink(missing_ok=True)
    for path in out.iterdir():
        if _OURS.fullmatch(path.name) and (not temporary_only or path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)


def _changed_settings(partial: Path, settings: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Keys whose value in the interrupted encode's ``partial`` file differs from ``settings``,
    and the saved settings (empty when unreadable: then every key differs)."""
    try:
        saved = json.loads(partial.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    keys = settings.keys() | saved.keys()
    return sorted(k for k in keys if settings.get(k) != saved.get(k)), saved


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_open(path) as handle:
        handle.write((json.dumps(value, indent=1) + "\n").encode("utf-8"))


def prepare_shard_dir(out: str | Path, settings: dict[str, Any], *, overwrite: bool) -> int:
    """Make ``out`` ready for an encode with ``settings``; return the shards already done.

    A new or empty directory starts at shard 0. A directory an encode with the same settings
    was interrupted in resumes after its complete shards (each was written whole, by rename).

    Args:
        out: the shard directory.
        settings: JSON-ready encode settings: ``num_images``, ``shard_size``, ``hflip``,
            ``shape``, ``dtype``, ``num_classes`` and whatever else the manifest should record.
        overwrite: delete a complete (or differently configured) encode's files first.

    Returns:
        Number of complete leading shards to skip.

    Raises:
        ConfigError: ``out`` is a file, holds a complete encode (without ``overwrite``), holds
            an interrupted encode with other settings (without ``overwrite``), or holds files
            that are not an encode's (never deleted).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"encode-latents: {out} is a file; OUT must be a directory or an .npz")
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from disk
    partial = out / PARTIAL_NAME
    names = {path.name for path in out.iterdir()} if out.is_dir() else set()
    if MANIFEST_NAME in names:
        if not overwrite:
            raise ConfigError(
                f"encode-latents: {out} holds a complete encode; pass --overwrite to replace it"
            )
        _remove_ours(out)
    elif PARTIAL_NAME in names:
        changed, saved = _changed_settings(partial, settings)
        if changed and not overwrite:
            key = changed[0]
            raise ConfigError(
                f"encode-latents: {out} holds an interrupted encode with other settings "
                f"({key}={saved.get(key)!r}, now {settings.get(key)!r}); rerun with the same "
                "ones to resume, or pass --overwrite to start over"
            )
        if changed:
            _remove_ours(out)
    elif any(not (_OURS.fullmatch(n) and n.endswith(".tmp")) for n in names):
        raise ConfigError(
            f"encode-latents: {out} is not empty and holds no encode ({MANIFEST_NAME} or "
            f"{PARTIAL_NAME}); choose a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    _remove_ours(out, temporary_only=True)  # what a killed run left half-written
    _write_json(partial, settings)
    done = 0
    while done < _num_shards(settings) and _shard_complete(out, settings, done):
        done += 1
    return done


def write_shard(out: str | Path, k: int, latents: np.ndarray, labels: np.ndarray) -> None:
    """Write shard ``k``: labels, then latents, each to a temporary file renamed into place.

    Args:
        out: the shard directory.
        k: shard number (its files are ``latents_{k:05d}.npy`` and ``labels_{k:05d}.npy``).
        latents: (n, C, H, W) float16/float32.
        labels: (n,) int64.
    """
    latent_name, label_name = _shard_names(k)
    for file, array in ((label_name, labels), (latent_name, latents)):
        with atomic_open(Path(out) / file) as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def finish_shard_dir(out: str | Path, settings: dict[str, Any]) -> Path:
    """Write the manifest of a fully written shard directory (last), then drop the settings file.

    Args:
        out: the shard directory.
        settings: the settings given to :func:`prepare_shard_dir`.

    Returns:
        The manifest's path.
    """
    out = Path(out)
    shards = []
    for k in range(_num_shards(settings)):
        latents, labels = _shard_names(k)
        shards.append({"latents": latents, "labels": labels, "count": shard_rows(settings, k)})
    manifest = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "num_samples": sum(entry["count"] for entry in shards),
        "scale_factor": None,  # stored unscaled; data.latent_scale applies
        **settings,
        "shards": shards,
    }
    _write_json(out / MANIFEST_NAME, manifest)
    (out / PARTIAL_NAME).unlink(missing_ok=True)
    return out / MANIFEST_NAME


# --- single files -------------------------------------------------------------------------------


def _read_npy_pair(path: Path, mmap: bool, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``latents.npy``-style data plus an optional ``labels.npy`` beside it."""
    label_path = path.with_name("labels.npy")
    try:
        latents = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        labels = np.load(label_path, allow_pickle=False) if label_path.is_file() else None
    except _NPZ_ERRORS as err:
        raise DataError(f"{name}: cannot read {path} or {label_path}: {err}") from None
    if not isinstance(latents, np.ndarray):
        raise DataError(f"{name}: {path} is an .npz archive, expected a single .npy array")
    return latents, labels


def _read_npz(path: Path, name: str) -> tuple[np.ndarray | None, np.ndarray | None, float | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{name}: {path} is a single .npy array, expected .npz")
            files = archive.files
            latents = archive["latents"] if "latents" in files else None
            labels = archive["labels"] if "labels" in files else None
            scale = float(archive["scale_factor"]) if "scale_factor" in files else None
    except _NPZ_ERRORS as err:
        raise DataError(f"{name}: cannot read {path} as .npz: {err}") from None
    return latents, labels, scale


def _read_safetensors(
    path: Path, name: str
) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            latents = f.get_tensor("latents") if "latents" in keys else None
            labels = f.get_tensor("labels") if "labels" in keys else None
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{name}: cannot read {path} as safetensors: {err}") from None
    scale = None
    if "scale_factor" in meta:
        try:
            scale = float(meta["scale_factor"])
        except ValueError:
            raise DataError(
                f"{name}: {path} metadata scale_factor={meta['scale_factor']!r} is not a number"
            ) from None
    return latents, labels, scale


def load_latents(
    path: str | Path,
    scale_factor: float | None = None,  # None: the file's scale_factor, else 1
    num_classes: int | None = None,  # default: max label + 1
    mmap: bool = False,  # .npy only: memory-map instead of loading (ImageNet-scale sets)
    name: str = "latents",
) -> ImageArrays:
    """Load precomputed latents (N, C, H, W) and labels (N,); values are not mapped to [-1, 1].

    Formats:
        A shard directory (with ``index.json``): streamed from memory-mapped shards, see
        :func:`load_latent_shards` (``mmap`` does not apply: it is always lazy).
        ``.npz``: arrays ``latents``, optional ``labels`` and scalar ``scale_factor``.
        ``.safetensors``: tensors ``latents``, optional ``labels``; optional metadata
        ``scale_factor``.
        ``.npy`` (or a directory holding ``latents.npy``): the latents; labels from
        ``labels.npy`` in the same directory when present.
        Without labels every sample gets label 0.

    Args:
        path: file or directory as above.
        scale_factor: multiplier for the latents (e.g. 0.18215 for SD-VAE); overrides a value
            stored in the file.
        num_classes: number of classes; inferred from the labels when None.
        mmap: memory-map a ``.npy`` file; batches are then read and scaled lazily by
            ``ImageArrays.take``.
        name: dataset name for messages and ``ImageArrays.name``.

    Returns:
        ImageArrays with ``latent=True``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file() or (path / PARTIAL_NAME).is_file():
            return load_latent_shards(path, scale_factor, num_classes, name)  # streamed
        if not (path / "latents.npy").is_file():
            raise DataError(
                f"{name}: {path} holds neither {MANIFEST_NAME} (a shard directory from tread "
                "encode-latents) nor latents.npy"
            )
        path = path / "latents.npy"
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise DataError(f"{name}: {path} has unsupported suffix (expected {LATENT_SUFFIXES})")
    if mmap and suffix != ".npy":
        raise ConfigError(f"{name}: mmap=True needs a .npy file, got {path}")
    stored_scale = None
    if suffix == ".npy":
        latents, labels = _read_npy_pair(path, mmap, name)
    elif suffix == ".npz":
        latents, labels, stored_scale = _read_npz(path, name)
    else:
        latents, labels, stored_scale = _read_safetensors(path, name)
    if latents is None:
        raise DataError(f"{name}: {path} has no 'latents' array")
    if latents.ndim != 4 or latents.shape[0] == 0:
        raise DataError(f"{name}: {path} latents must be (N, C, H, W), got {tuple(latents.shape)}")
    is_float = (
        latents.is_floating_point()
        if isinstance(latents, torch.Tensor)
        else (np.issubdtype(latents.dtype, np.floating))
    )
    if not is_float:
        raise DataError(f"{name}: {path} latents must be floating point, got {latents.dtype}")
    scale = float(scale_factor if scale_factor is not None else stored_scale or 1.0)
    if not np.isfinite(scale) or scale == 0:
        raise ConfigError(
            f"{name}: scale factor (data.latent_scale) must be finite and non-zero, got {scale}"
        )

    n = int(latents.shape[0])
    if labels is None:
        label_t = torch.zeros(n, dtype=torch.int64)
    else:
        label_t = torch.as_tensor(np.asarray(labels)) if isinstance(labels, np.ndarray) else labels
        if label_t.ndim != 1 or label_t.is_floating_point() or label_t.is_complex():
            raise DataError(
                f"{name}: {path} labels must be 1-D integers, got {label_t.dtype} "
                f"{tuple(label_t.shape)}"
            )
        label_t = label_t.to(torch.int64)
        if label_t.shape[0] != n:
            raise DataError(f"{name}: {path} has {label_t.shape[0]} labels for {n} latents")
    classes = classes_from_labels(label_t, num_classes, path, name)

    if mmap:
        # Stays on disk; ImageArrays.take applies the scale per batch.
        return ImageArrays(
            images=latents, labels=label_t, num_classes=classes, name=name, latent=True, scale=scale
        )
    images = torch.as_tensor(latents).to(torch.float32).contiguous()
    if not bool(torch.isfinite(images).all()):
        raise DataError(f"{name}: {path} latents contain NaN or Inf")
    if scale != 1.0:
        images = images * scale  # out of place: `images` may share memory with the loaded array
    return ImageArrays(images=images, labels=label_t, num_classes=classes, name=name, latent=True)
