"""Read ADM-style (openai/guided-diffusion evaluator) ``.npz`` batches.

A reference batch such as ``VIRTUAL_imagenet256_labeled.npz`` holds ``arr_0`` (N, H, W, 3) uint8
images and usually precomputed ``mu``/``sigma`` (pool_3, 2048-d) and ``mu_s``/``sigma_s``
(spatial, 2023-d) of the full dataset. A sample batch holds only ``arr_0`` (and ``arr_1`` labels
for class-conditional samples).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from tread.errors import DataError
from tread.eval.evaluate import extract_features
from tread.eval.features import FeatureNet
from tread.eval.inception import InceptionV3FID
from tread.eval.stats import FeatureStats, load_stats


def _open(path: str | PathLike[str]) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ADM batch not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz batch ({err})") from err


def uint8_nhwc_to_float(images: np.ndarray) -> torch.Tensor:
    """Convert ADM's (B, H, W, 3) uint8 images to (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return x.float() / 127.5 - 1.0


def load_adm_images(path: str | PathLike[str]) -> np.ndarray:
    """Load ``arr_0`` of an ADM batch: (N, H, W, 3) uint8 (kept as uint8: 50k 256² images ≈ 10 GB).

    Args:
        path: the ``.npz`` batch.

    Returns:
        The uint8 image array.
    """
    with _open(path) as data:
        if "arr_0" not in data.files:
            raise DataError(f"{path}: no 'arr_0' images in this batch")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: arr_0 must be (N, H, W, 3) uint8: {images.shape} {images.dtype}")
    return images


def iter_adm_images(images: np.ndarray, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) float batches in [-1, 1] from a uint8 NHWC array, converting lazily.

    Args:
        images: (N, H, W, 3) uint8, e.g. from :func:`load_adm_images`.
        batch_size: images per batch.
    """
    for start in range(0, images.shape[0], batch_size):
        yield uint8_nhwc_to_float(images[start : start + batch_size])


def adm_reference_stats(
    path: str | PathLike[str],
    net: FeatureNet | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> FeatureStats:
    """Statistics of an ADM reference batch.

    The file's precomputed ``mu``/``sigma`` (and ``mu_s``/``sigma_s``) are used when `net` is
    None or the FID Inception (ADM computed them with the TF graph this net ports). With `net`
    given, the ``arr_0`` images are run through it to keep per-image features for KID and
    precision/recall (ADM keeps 10k images for exactly this), and to compute the moments when
    the file has none or `net` is a different network.

    Args:
        path: e.g. ``VIRTUAL_imagenet256_labeled.npz``.
        net: feature network, or None to read only the precomputed moments.
        batch_size: images per forward pass.
        device: where to run the net.

    Returns:
        The :class:`FeatureStats`.
    """
    with _open(path) as data:
        keys = set(data.files)
    has_moments = {"mu", "sigma"} <= keys
    moments = load_stats(path) if has_moments else None
    if net is None:
        if moments is None:
            raise DataError(f"{path}: no precomputed mu/sigma; pass a feature net to use arr_0")
        net_name = InceptionV3FID.name if moments.mu.shape[0] == 2048 else ""
        return FeatureStats(
            mu=moments.mu,
            sigma=moments.sigma,
            mu_s=moments.mu_s,
            sigma_s=moments.sigma_s,
            net=net_name,
            source=str(path),
        )
    feats = extract_features(
        net, iter_adm_images(load_adm_images(path), batch_size), keep_logits=False, device=device
    )
    use_file = moments is not None and net.name == InceptionV3FID.name
    if use_file and moments.mu.shape != feats.mu.shape:
        raise DataError(
            f"{path}: mu has {moments.mu.shape[0]} dims but {net.name} gives {feats.mu.shape[0]}"
        )
    return FeatureStats(
        mu=moments.mu if use_file else feats.mu,
        sigma=moments.sigma if use_file else feats.sigma,
        num_samples=moments.num_samples if use_file else feats.count,
        features=feats.pool,
        mu_s=moments.mu_s if use_file and moments.mu_s is not None else feats.mu_s,
        sigma_s=moments.sigma_s if use_file and moments.sigma_s is not None else feats.sigma_s,
        net=net.name,
        source=str(path),
    )
