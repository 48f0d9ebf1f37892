"""ImageArrays: the one in-memory (or memory-mapped) dataset type every loader returns, and
ShardedArray, the lazy row store behind latent shard directories."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tread.errors import DataError

__all__ = [
    "MAX_CLASSES",
    "ImageArrays",
    "ShardedArray",
    "classes_from_labels",
    "npy_header",
    "to_unit_range",
]

# Dropping a mapping's pages after each read keeps the resident set at about one batch. Where
# the platform has no MADV_DONTNEED (Windows), each shard's map is closed instead and reopened
# on the next read that needs it.
_CAN_DROP_PAGES = hasattr(mmap, "MADV_DONTNEED")

# More classes than any real label set (ImageNet-21k has 21,843). A larger label is corrupt
# data: inferring num_classes from it would make the model allocate a class embedding of
# gigabytes (label 1e9 asked for 512 GB) instead of failing with a message.
MAX_CLASSES = 100_000


def to_unit_range(pixels: np.ndarray, max_value: float = 255.0) -> torch.Tensor:
    """Map integer pixel values in [0, max_value] to float32 in [-1, 1].

    Args:
        pixels: integer array of any shape, values in [0, max_value].
        max_value: the value that maps to +1.

    Returns:
        float32 tensor of the same shape.
    """
    # Divide in float64 would double peak memory on 60k-image sets; float32 is exact enough
    # for 8-bit inputs (every k / 127.5 - 1 is representable to < 1 ulp).
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32)
    return x.mul_(2.0 / max_value).sub_(1.0)


def classes_from_labels(
    labels: torch.Tensor, num_classes: int | None, source: str | Path, name: str
) -> int:
    """Check int64 labels (N,) read from ``source`` and return the number of classes.

    Args:
        labels: (N,) int64 labels as stored.
        num_classes: the declared number of classes, or None to infer max label + 1.
        source: the file or directory the labels came from (named in errors).
        name: dataset name for messages.

    Returns:
        ``num_classes``, or max label + 1 when it is None.

    Raises:
        DataError: a negative label, a label >= ``num_classes``, or one beyond MAX_CLASSES.
    """
    if labels.numel() == 0:
        return 1 if num_classes is None else num_classes
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"{name}: {source} has negative label {lo}")
    if num_classes is not None and hi >= num_classes:
        raise DataError(f"{name}: {source} has label {hi} but num_classes is {num_classes}")
    if hi >= MAX_CLASSES:
        raise DataError(
            f"{name}: {source} has label {hi}; labels must be class indices below "
            f"{MAX_CLASSES:,} (is the labels array corrupt or not class indices?)"
        )
    return hi + 1 if num_classes is None else num_classes


def npy_header(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Read a ``.npy`` file's header without loading its data.

    Args:
        path: the file.
        name: dataset name for messages.

    Returns:
        (shape, dtype, byte offset of the data).

    Raises:
        DataError: the file is unreadable, truncated, not a single array, or Fortran-ordered.
    """
    try:
        view = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{name}: cannot read {path} as .npy: {err}") from None
    if not isinstance(view, np.memmap):
        raise DataError(f"{name}: {path} is not a single .npy array")
    if view.ndim > 1 and not view.flags.c_contiguous:
        raise DataError(f"{name}: {path} is stored in Fortran order; save it C-ordered")
    shape, dtype, offset = tuple(int(d) for d in view.shape), view.dtype, int(view.offset)
    del view  # unmaps: only the header was read
    return shape, dtype, offset


def _first_nonfinite(rows: np.ndarray) -> int | None:
    """Position of the first (C, H, W) row of ``rows`` (B, C, H, W) holding NaN/Inf, or None."""
    finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)  # (B,)
    return None if finite.all() else int(np.argmin(finite))


class ShardedArray:
    """A read-only (N, C, H, W) float array stored as consecutive ``.npy`` files (shards).

    Nothing is loaded up front: :meth:`read` memory-maps the shards a batch touches, copies
    the requested rows out and then releases the mapped pages (``madvise(MADV_DONTNEED)``, or
    closing the map where that is missing). A process's resident memory therefore grows by
    about one batch, not by the pages it has touched so far: a plain ``np.memmap`` read in a
    random order keeps every page it touched resident and ends an epoch holding the whole set.
    The file data stays in the OS page cache, shared by all processes on the machine.

    Args:
        files: the shard files in row order, each (n_k, C, H, W) float16/float32, C-ordered.
        name: dataset name for messages.

    Raises:
        DataError: a shard is unreadable, not 4-D, not float16/float32, or its per-sample
            shape or dtype differs from the first shard's; the message names the file.
    """

    def __init__(self, files: Sequence[str | Path], name: str = "latents") -> None:
        if not files:
            raise DataError(f"{name}: a sharded array needs at least one file")
        self.files = [Path(f) for f in files]
        self.name = name
        headers = [npy_header(f, name) for f in self.files]
        first_shape, first_dtype, _ = headers[0]
        for path, (shape, dtype, _) in zip(self.files, headers, strict=True):
            if len(shape) != 4:
                raise DataError(f"{name}: {path} must hold (n, C, H, W) latents, got {shape}")
            if dtype not in (np.float16, np.float32):
                raise DataError(f"{name}: {path} latents must be float16/float32, got {dtype}")
            if shape[1:] != first_shape[1:] or dtype != first_dtype:
                raise DataError(
                    f"{name}: {path} holds {dtype} {shape[1:]} latents but {self.files[0]} "
                    f"holds {first_dtype} {first_shape[1:]}"
                )
        self.dtype = np.dtype(first_dtype)
        self.counts = [shape[0] for shape, _, _ in headers]
        self._offsets = [offset for _, _, offset in headers]
        self._starts = np.cumsum([0, *self.counts])  # (K + 1,) first row of each shard
        self.shape = (int(self._starts[-1]), *first_shape[1:])
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}
        self._lock = threading.Lock()  # a prefetch thread and the caller may both read

    @property
    def ndim(self) -> int:
        """Always 4."""
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    def _view(self, k: int) -> np.ndarray:
        """Shard ``k`` as a read-only (n_k, C, H, W) array over its (kept open) map."""
        if k not in self._maps:
            path = self.files[k]
            try:
                with open(path, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as err:
                raise DataError(f"{self.name}: cannot memory-map {path}: {err}") from None
            if _CAN_DROP_PAGES:
                mapped.madvise(mmap.MADV_RANDOM)  # batches jump around: no read-ahead
            rows = (self.counts[k], *self.shape[1:])
            count = int(np.prod(rows))
            if self._offsets[k] + count * self.dtype.itemsize > len(mapped):
                mapped.close()
                raise DataError(f"{self.name}: {path} is shorter than its header says (truncated)")
            view = np.frombuffer(mapped, self.dtype, count, self._offsets[k]).reshape(rows)
            self._maps[k] = (mapped, view)
        return self._maps[k][1]

    def _release(self, k: int) -> None:
        """Drop shard ``k``'s resident pages (the page cache keeps the data)."""
        if _CAN_DROP_PAGES:
            self._maps[k][0].madvise(mmap.MADV_DONTNEED)
            return
        mapped, view = self._maps.pop(k)
        del view  # the array holds the map's buffer; it must go before close()
        mapped.close()

    def read(self, indices: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Copy rows out, in the order asked for.

        Args:
            indices: (B,) integer row indices in [0, N), any order, repeats allowed.
            dtype: dtype of the result (the rows are cast as they are copied); None: stored.

        Returns:
            (B, C, H, W) array, owned (not a view of a map).

        Raises:
            DataError: an index is out of range, or a row read is NaN/Inf (the message names
                the shard file; only the rows read are checked, one batch at a time).
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise DataError(f"{self.name}: row indices out of range [0, {len(self)})")
        out = np.empty((idx.size, *self.shape[1:]), dtype or self.dtype)  # (B, C, H, W)
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # (B,) shard of each row
        with self._lock:
            for k in np.unique(shard).tolist():
                where = np.flatnonzero(shard == k)  # (b_k,) positions in the batch
                local = idx[where] - self._starts[k]  # (b_k,) rows inside shard k
                order = np.argsort(local, kind="stable")  # ascending: the file is read forwards
                try:
                    rows = np.take(self._view(k), local[order], axis=0)  # (b_k, C, H, W) copy
                finally:
                    if k in self._maps:
                        self._release(k)
                bad = _first_nonfinite(rows)
                if bad is not None:
                    row = int(local[order][bad])
                    raise DataError(f"{self.name}: {self.files[k]} row {row} holds NaN/Inf")
                out[where[order]] = rows
        return out

    def close(self) -> None:
        """Unmap every shard (reads reopen them)."""
        with self._lock:
            for k in list(self._maps):
                mapped, view = self._maps.pop(k)
                del view
                mapped.close()

    def __getstate__(self) -> dict[str, Any]:
        # Maps and locks do not pickle (spawned workers); the copy reopens what it reads.
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


@dataclass
class ImageArrays:
    """A labelled image (or latent) dataset held as arrays.

    The values a model trains on are ``images[i] * scale``. In-memory loaders fold any scale
    into ``images`` and leave ``scale=1``; only a memory-mapped latent array keeps ``scale``
    separate, because multiplying it would read the whole file. Use :meth:`take` to get
    batches so both cases behave the same.

    Attributes:
        images: (N, C, H, W). A float32 tensor in [-1, 1] for pixel data, or raw latents
            (unscaled by this class) when ``latent`` is true. Latents may also be a float16 or
            float32 numpy array (e.g. ``np.memmap``) or a :class:`ShardedArray`, both indexed
            lazily by :meth:`take`.
        labels: (N,) int64 tensor, values in [0, num_classes).
        num_classes: number of classes (1 for an unlabelled set).
        name: short dataset name used in messages and logs.
        latent: whether ``images`` are autoencoder latents rather than pixels.
        scale: multiplier applied by :meth:`take` (only differs from 1 for lazy arrays).
    """

    images: torch.Tensor | np.ndarray | ShardedArray
    labels: torch.Tensor
    num_classes: int
    name: str
    latent: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        imgs, labels, name = self.images, self.labels, self.name
        if not isinstance(name, str) or not name:
            raise DataError(f"ImageArrays: name must be a non-empty string, got {name!r}")
        if isinstance(imgs, torch.Tensor):
            if imgs.dtype != torch.float32:
                raise DataError(f"{name}: images must be float32, got {imgs.dtype}")
            if self.scale != 1.0:
                # Keeping scale separate only makes sense for lazy arrays; a tensor is
                # already in memory, so fold the scale in at load time instead.
                raise DataError(f"{name}: scale must be 1 for tensor images, got {self.scale}")
        elif isinstance(imgs, np.ndarray | ShardedArray):
            if not self.latent:
                raise DataError(f"{name}: lazy images are only supported for latent data")
            if imgs.dtype not in (np.float16, np.float32):
                raise DataError(f"{name}: latent array must be float16/float32, got {imgs.dtype}")
        else:
            raise DataError(f"{name}: images must be a tensor or numpy array, got {type(imgs)}")
        if imgs.ndim != 4:
            raise DataError(f"{name}: images must be (N, C, H, W), got shape {tuple(imgs.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels)
            raise DataError(f"{name}: labels must be an int64 tensor, got {kind}")
        if labels.ndim != 1 or labels.shape[0] != imgs.shape[0]:
            raise DataError(
                f"{name}: labels shape {tuple(labels.shape)} does not match {imgs.shape[0]} images"
            )
        if imgs.shape[0] == 0:
            raise DataError(f"{name}: dataset is empty")
        if not isinstance(self.num_classes, int) or not 1 <= self.num_classes <= MAX_CLASSES:
            raise DataError(
                f"{name}: num_classes must be an int in [1, {MAX_CLASSES}], got {self.num_classes}"
            )
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"{name}: labels span [{lo}, {hi}] but num_classes is {self.num_classes}"
            )
        if not np.isfinite(self.scale) or self.scale == 0:
            raise DataError(f"{name}: scale must be finite and non-zero, got {self.scale}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-sample shape (C, H, W)."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather samples by index, reading lazily from numpy arrays.

        Args:
            indices: (B,) int64 indices into the dataset.

        Returns:
            images (B, C, H, W) float32 (times ``scale``) and labels (B,) int64.

        Raises:
            DataError: lazily read rows are NaN/Inf (checked per batch: the file is never
                scanned whole).
        """
        labels = self.labels[indices]
        if isinstance(self.images, torch.Tensor):
            return self.images[indices], labels
        idx = indices.numpy()
        if isinstance(self.images, ShardedArray):
            images = torch.from_numpy(self.images.read(idx, np.float32))  # (B, C, H, W)
            return (images.mul_(self.scale) if self.scale != 1.0 else images), labels
        # Read in ascending order so a memmap touches the file sequentially, then undo it.
        order = np.argsort(idx, kind="stable")
        rows = np.empty_like(order)
        rows[order] = np.arange(len(order))
        picked = np.asarray(self.images[idx[order]])[rows]  # (B, C, H, W)
        bad = _first_nonfinite(picked)
        if bad is not None:
            raise DataError(f"{self.name}: latent row {int(idx[bad])} holds NaN/Inf")
        images = torch.from_numpy(picked).to(torch.float32)
        if self.scale != 1.0:
            images.mul_(self.scale)
        return images, labels
