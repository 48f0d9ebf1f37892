"""Precomputed autoencoder latents, kept unnormalised: single files (``.npy`` / ``.npz`` /
``.safetensors``, read whole) and shard directories (streamed; their layout, reader and writer
are in :mod:`tread.data.shards`).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from tread.data.arrays import ImageArrays, classes_from_labels
from tread.data.shards import MANIFEST_NAME, PARTIAL_NAME, load_latent_shards
from tread.errors import ConfigError, DataError

__all__ = ["LATENT_SUFFIXES", "load_latents"]

LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


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
