"""Shard directories of precomputed autoencoder latents: the manifest, the streaming reader and
the writer that ``tread encode-latents`` uses.

Layout of a shard directory::

    latents_00000.npy   (n, C, H, W) float16/float32 latents of shard 0, unnormalised
    labels_00000.npy    (n,) int64 labels of shard 0
    latents_00001.npy   ...
    index.json          the manifest: format, version, num_samples, shape [C, H, W], dtype,
                        num_classes, scale_factor, the encode settings, and per shard its
                        latents / labels file names and row count

Every file is written to a temporary name and renamed into place, ``index.json`` last: a
directory with a manifest is complete. While ``tread encode-latents`` fills one, it holds
``encode.partial.json`` instead (its settings), which lets an interrupted encode resume after
its complete shards. With hflip, each shard holds its images, then their mirrors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    "MANIFEST_NAME",
    "PARTIAL_NAME",
    "finish_shard_dir",
    "load_latent_shards",
    "prepare_shard_dir",
    "read_manifest",
    "shard_rows",
    "write_shard",
]

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


def num_shards(settings: dict[str, Any]) -> int:
    """Shards an encode with ``settings`` writes: ``num_images / shard_size``, rounded up."""
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
    while done < num_shards(settings) and _shard_complete(out, settings, done):
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
    for k in range(num_shards(settings)):
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
