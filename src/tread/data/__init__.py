"""Offline datasets as ImageArrays, and the BatchStream that feeds them to training.

Nothing here downloads: digits ship with scikit-learn, Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` (or any IDX directory), everything else from a path you give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from tread.data.arrays import ImageArrays, ShardedArray
from tread.data.digits import Split, load_digits
from tread.data.folder import load_image_folder, load_npz_images
from tread.data.idx import find_idx_dir, load_idx_dir, read_idx, write_idx
from tread.data.latents import load_latents
from tread.data.loader import BatchStream, derive_seed
from tread.data.shards import load_latent_shards
from tread.errors import ConfigError

__all__ = [
    "DATASET_NAMES",
    "BatchStream",
    "DatasetName",
    "ImageArrays",
    "ShardedArray",
    "derive_seed",
    "find_idx_dir",
    "load_dataset",
    "load_digits",
    "load_idx_dir",
    "load_image_folder",
    "load_latent_shards",
    "load_latents",
    "load_npz_images",
    "read_idx",
    "write_idx",
]

DatasetName = Literal["digits", "fashion_mnist", "mnist", "idx", "folder", "npz", "latents"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
SPLITS: tuple[str, ...] = get_args(Split)

# Extra keyword options each dataset accepts; anything else is a ConfigError, not ignored.
_OPTIONS: dict[str, frozenset[str]] = {
    "digits": frozenset(),
    "fashion_mnist": frozenset({"pad_to"}),
    "mnist": frozenset({"pad_to"}),
    "idx": frozenset({"pad_to", "num_classes"}),
    "folder": frozenset({"mode"}),
    "npz": frozenset({"num_classes"}),
    "latents": frozenset({"scale_factor", "num_classes", "mmap"}),
}


def load_dataset(
    name: DatasetName,
    path: str | Path | None = None,
    split: Split = "train",
    resolution: int | None = None,
    **opts: Any,
) -> ImageArrays:
    """Load a dataset by name.

    Args:
        name: one of ``DATASET_NAMES``.
        path: data location; not used by "digits", optional for "fashion_mnist"/"mnist"
            (auto-detected under ``/usr/share/datasets``), required otherwise.
        split: "train", "test" or "all". Only digits and IDX sets have a test split; folder,
            npz and latents accept "train"/"all" (the whole file).
        resolution: output side length. digits: must be 8. IDX: pad to it (never resized).
            folder/npz: resize + centre crop. latents: must equal the latent side (a check).
            For latents, ``path`` may be a shard directory (``tread encode-latents`` output):
            it is always streamed from memory maps, never loaded whole.
        **opts: per-dataset options: ``pad_to`` (IDX), ``num_classes`` (idx, npz, latents),
            ``mode`` ("RGB"/"L", folder), ``scale_factor`` and ``mmap`` (latents).

    Returns:
        ImageArrays.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"data.name: unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    if split not in SPLITS:
        raise ConfigError(f"{name}: split must be one of {SPLITS}, got {split!r}")
    unknown = sorted(set(opts) - _OPTIONS[name])
    if unknown:
        allowed = sorted(_OPTIONS[name]) or "none"
        raise ConfigError(f"{name}: unknown option(s) {unknown}; allowed: {allowed}")
    if name == "digits":
        if path is not None:
            raise ConfigError(
                f"digits: is bundled with scikit-learn and reads no files; got data.path={path!r}"
            )
        if resolution not in (None, 8):
            raise ConfigError(f"digits: images are 8x8; got data.resolution={resolution}")
        return load_digits(split)
    if name in ("fashion_mnist", "mnist", "idx"):
        pad_to = opts.pop("pad_to", None)
        if resolution is not None and pad_to is not None and resolution != pad_to:
            raise ConfigError(
                f"{name}: data.resolution={resolution} conflicts with data.pad_to={pad_to}"
            )
        if path is None:
            if name == "idx":
                raise ConfigError("idx: data.path= is required (a directory of IDX files)")
            path = find_idx_dir(name)
        if name != "idx":
            opts["num_classes"] = 10
        return load_idx_dir(path, split, pad_to=pad_to or resolution, name=name, **opts)
    if path is None:
        raise ConfigError(f"{name}: data.path= is required")
    if split == "test":
        raise ConfigError(
            f"{name}: has no built-in test split; point data.path at held-out data and set "
            "data.split=train"
        )
    if name == "folder":
        return load_image_folder(path, resolution=resolution, name=name, **opts)
    if name == "npz":
        return load_npz_images(path, resolution=resolution, name=name, **opts)
    data = load_latents(path, name=name, **opts)
    if resolution is not None and data.shape[1:] != (resolution, resolution):
        raise ConfigError(
            f"latents: data.resolution={resolution} but {path} holds "
            f"{data.shape[1]}x{data.shape[2]} latents (it is the latent side here; or leave it "
            "unset)"
        )
    return data
