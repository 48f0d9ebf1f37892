"""IDX files (the MNIST / Fashion-MNIST format): reader, writer and directory loader.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 sizes, then the values in C order, big-endian. Files may be gzipped; we detect that from
the content, not the file name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tread.data.arrays import ImageArrays, classes_from_labels, to_unit_range
from tread.errors import ConfigError, DataError

__all__ = [
    "IDX_SEARCH_DIRS",
    "find_idx_dir",
    "load_idx_dir",
    "pad_images",
    "read_idx",
    "write_idx",
]

# Where distribution packages install IDX sets; checked in order when no path is given.
# Debian's `dataset-fashion-mnist` installs the four .gz files in the first directory.
IDX_SEARCH_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}

# IDX dtype code -> numpy dtype (big-endian, as stored on disk).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
# File-name prefix of each split in the original distribution ("t10k" = the 10k test set).
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path, name: str = "idx") -> np.ndarray:
    """Read one IDX file (plain or gzipped) with its header checked against its size.

    Args:
        path: the file.
        name: dataset name used as the prefix of error messages.

    Returns:
        Array with the file's shape and a native-endian dtype.

    Raises:
        DataError: the file is missing, unreadable, not IDX, or truncated/oversized.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{name}: file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as err:
        # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError.
        raise DataError(f"{name}: cannot read {path}: {err}") from None
    if len(raw) < 4:
        raise DataError(f"{name}: {path} is too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{name}: {path} has bad IDX magic number 0x{raw[:4].hex()}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: {path} is truncated inside its IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{name}: {path} {what}: header {dims} needs {expected} data bytes, found {found}"
        )
    # .astype copies into a writable, native-endian array (frombuffer views immutable bytes).
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write an array as an IDX file, gzipped when ``path`` ends in ``.gz``.

    Args:
        path: destination file.
        array: array of a dtype IDX supports (uint8, int8, int16, int32, float32, float64).

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: unsupported array dtype {array.dtype} / ndim {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if path.suffix == ".gz":
        # mtime=0 makes the bytes reproducible across runs.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def _find_file(root: Path, prefix: str, kind: str, idx_tag: str, name: str) -> Path:
    """Locate e.g. ``train-images-idx3-ubyte[.gz]`` (or the ``train-images.idx3-ubyte`` variant)."""
    for stem in (f"{prefix}-{kind}-{idx_tag}-ubyte", f"{prefix}-{kind}.{idx_tag}-ubyte"):
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(
        f"{name}: no IDX files under {root} (expected {prefix}-{kind}-{idx_tag}-ubyte[.gz])"
    )


def find_idx_dir(name: str) -> Path:
    """Return the first installed directory for a known IDX dataset.

    Args:
        name: "fashion_mnist" or "mnist".

    Returns:
        The directory holding its IDX files.
    """
    candidates = IDX_SEARCH_DIRS.get(name)
    if candidates is None:
        raise ConfigError(f"{name}: no default location known; set data.path=DIR")
    for candidate in candidates:
        if Path(candidate).is_dir():
            return Path(candidate)
    hint = " (Debian: apt install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    raise DataError(
        f"{name}: not found in {', '.join(candidates)}; set data.path=DIR to its IDX files{hint}"
    )


def _load_split(root: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one split's images (N, H, W) uint8 and labels (N,)."""
    prefix = _SPLIT_PREFIX[split]
    image_file = _find_file(root, prefix, "images", "idx3", name)
    label_file = _find_file(root, prefix, "labels", "idx1", name)
    images, labels = read_idx(image_file, name), read_idx(label_file, name)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{name}: {image_file} must hold uint8 (N, H, W) images, "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}: {label_file} holds {labels.shape} labels for {images.shape[0]} images"
        )
    return images, labels


def load_idx_dir(
    path: str | Path,
    split: Literal["train", "test", "all"] = "train",
    pad_to: int | None = None,  # pad H and W to this size with background (-1)
    num_classes: int | None = None,  # default: max label + 1
    name: str = "idx",
) -> ImageArrays:
    """Load an MNIST-style directory of IDX files scaled to [-1, 1].

    Args:
        path: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: "train", "test" (the ``t10k`` files) or "all" (train then test).
        pad_to: if given, pad images centrally to ``pad_to`` × ``pad_to`` with -1; 28 → 32
            makes the size divisible by patch sizes 2, 4 and 8 (and 16/32 after a stem).
        num_classes: number of classes; inferred from the labels when None.
        name: dataset name for messages and ``ImageArrays.name``.

    Returns:
        ImageArrays with images (N, 1, H, W) and labels (N,).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{name}: directory not found: {root}")
    if split not in ("train", "test", "all"):
        raise ConfigError(f"{name}: split must be one of train, test, all; got {split!r}")
    splits = ("train", "test") if split == "all" else (split,)
    parts = [_load_split(root, s, name) for s in splits]
    if len({p[0].shape[1:] for p in parts}) != 1:
        raise DataError(f"{name}: train and test images under {root} differ in size")
    pixels = np.concatenate([p[0] for p in parts])
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    classes = classes_from_labels(labels, num_classes, f"the label files under {root}", name)
    images = to_unit_range(pixels).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    if pad_to is not None:
        images = pad_images(images, pad_to, name)
    return ImageArrays(images=images, labels=labels, num_classes=classes, name=name)


def pad_images(images: torch.Tensor, size: int, name: str = "idx") -> torch.Tensor:
    """Pad (N, C, H, W) images centrally to (N, C, size, size) with the background value -1.

    Args:
        images: (N, C, H, W) in [-1, 1].
        size: target height and width, at least H and W.
        name: dataset name for messages.

    Returns:
        (N, C, size, size) tensor (the input itself when no padding is needed).
    """
    h, w = images.shape[-2:]
    if size < h or size < w:
        raise ConfigError(f"{name}: data.pad_to={size} is smaller than the images ({h}x{w})")
    if size == h == w:
        return images
    top, left = (size - h) // 2, (size - w) // 2
    # (left, right, top, bottom) for the last two dims; extra odd pixel goes right/bottom.
    return F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)
