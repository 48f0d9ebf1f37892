"""ImageArrays: the one in-memory (or memory-mapped) dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tread.errors import DataError

__all__ = ["MAX_CLASSES", "ImageArrays", "classes_from_labels", "to_unit_range"]

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
            float32 numpy array (e.g. ``np.memmap``), indexed lazily by :meth:`take`.
        labels: (N,) int64 tensor, values in [0, num_classes).
        num_classes: number of classes (1 for an unlabelled set).
        name: short dataset name used in messages and logs.
        latent: whether ``images`` are autoencoder latents rather than pixels.
        scale: multiplier applied by :meth:`take` (only differs from 1 for lazy arrays).
    """

    images: torch.Tensor | np.ndarray
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
        elif isinstance(imgs, np.ndarray):
            if not self.latent:
                raise DataError(f"{name}: numpy images are only supported for latent data")
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
        """
        labels = self.labels[indices]
        if isinstance(self.images, torch.Tensor):
            return self.images[indices], labels
        idx = indices.numpy()
        # Read in ascending order so a memmap touches the file sequentially, then undo it.
        order = np.argsort(idx, kind="stable")
        rows = np.empty_like(order)
        rows[order] = np.arange(len(order))
        picked = np.asarray(self.images[idx[order]])[rows]
        images = torch.from_numpy(picked).to(torch.float32)
        if self.scale != 1.0:
            images.mul_(self.scale)
        return images, labels
