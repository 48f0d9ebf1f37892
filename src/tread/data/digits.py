"""scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): the smallest offline dataset."""

from __future__ import annotations

from typing import Literal

import torch

from tread.data.arrays import ImageArrays, to_unit_range
from tread.errors import ConfigError

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "Split",
    "digits_split_indices",
    "load_digits",
]

Split = Literal["train", "test", "all"]

# The held-out split is fixed forever: a permutation of 0..N-1 drawn from a generator seeded
# with DIGITS_SPLIT_SEED; its first floor(N * 1/5) entries are "test" (359 images), the rest
# "train" (1,438). Classifier accuracy reported by tread.eval is measured on "test", so changing
# either constant silently changes published numbers.
DIGITS_SPLIT_SEED = 20240
DIGITS_TEST_FRACTION = 0.2


def digits_split_indices(num_samples: int, split: Split) -> torch.Tensor:
    """Indices of one split of the fixed digits train/test partition.

    Args:
        num_samples: dataset size N.
        split: "train", "test" or "all".

    Returns:
        (M,) int64 indices in ascending order (so samples keep the bundled order).
    """
    if split == "all":
        return torch.arange(num_samples)
    if split not in ("train", "test"):
        raise ConfigError(f"digits: split must be one of train, test, all; got {split!r}")
    gen = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(num_samples, generator=gen)
    num_test = int(num_samples * DIGITS_TEST_FRACTION)
    chosen = perm[:num_test] if split == "test" else perm[num_test:]
    return chosen.sort().values


def load_digits(split: Split = "train") -> ImageArrays:
    """Load the digits set scaled to [-1, 1].

    Args:
        split: "train" (4/5), "test" (1/5, fixed; see ``DIGITS_SPLIT_SEED``) or "all".

    Returns:
        ImageArrays with images (M, 1, 8, 8) and labels (M,) in 0..9.
    """
    # Imported here: scikit-learn is slow to import and only this loader needs it.
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    # bunch.images: (1797, 8, 8) float64 with integer values 0..16.
    pixels = bunch.images.astype("uint8")
    idx = digits_split_indices(pixels.shape[0], split)
    images = to_unit_range(pixels, max_value=16.0)[idx].unsqueeze(1)  # (M, 8, 8) -> (M, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype("int64"))[idx]
    return ImageArrays(images=images, labels=labels, num_classes=10, name="digits")
