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
from typing import Literal

import numpy as np
import torch

from tread.errors import ConfigError, DataError
from tread.eval.evaluate import extract_features
from tread.eval.features import FeatureNet
from tread.eval.inception import InceptionV3FID
from tread.eval.stats import FeatureStats, load_stats


def _open(path: str | PathLike[str]) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if not zipfile.is_zipfile(path):
        # np.load would read a .npy array or try to unpickle anything else; refuse both here.
        raise DataError(f"{path}: not an .npz archive")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err


def reference_file_kind(path: str | PathLike[str]) -> Literal["adm", "stats"]:
    """Tell an ADM batch (``arr_0`` images) from a stats file (``mu``/``sigma``) by its keys.

    Raises:
        DataError: the file is missing, not an ``.npz`` archive, or has neither layout.
    """
    with _open(path) as data:
        keys = set(data.files)
    if "arr_0" in keys:
        return "adm"
    if {"mu", "sigma"} <= keys:
        return "stats"
    found = ", ".join(sorted(keys)) or "none"
    raise DataError(
        f"{path}: neither a stats .npz (keys mu, sigma) nor an ADM batch (key arr_0); "
        f"keys found: {found}"
    )


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


ADM_MOMENTS = "TF Inception-v3 2015-12-05 graph (ADM evaluator, precomputed)"


def adm_reference_stats(
    path: str | PathLike[str],
    net: FeatureNet | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    use_file_moments: bool = False,
) -> FeatureStats:
    """Statistics of an ADM reference batch.

    With `net`, the ``arr_0`` images are run through it and the moments are **recomputed** from
    its features, so both sides of FD/FID come from the same network; the per-image features
    are kept for KID and precision/recall (ADM keeps 10k images for exactly this). The file's
    precomputed ``mu``/``sigma`` come from ADM's TF Inception graph, which our PyTorch port
    matches only to ~0.1–1 % of FID. They are used when `net` is None (moments only) or when
    `use_file_moments` is set (with the FID Inception only); ``moments_source`` of the result
    then says so, and ``tread eval`` records it.

    Args:
        path: e.g. ``VIRTUAL_imagenet256_labeled.npz``.
        net: feature network, or None to read only the precomputed moments.
        batch_size: images per forward pass.
        device: where to run the net.
        use_file_moments: take mu/sigma (and mu_s/sigma_s) from the file instead of `net`.

    Returns:
        The :class:`FeatureStats`.
    """
    with _open(path) as data:
        keys = set(data.files)
    has_moments = {"mu", "sigma"} <= keys
    moments = load_stats(path) if has_moments else None
    precomputed = f"precomputed in {path} with the {ADM_MOMENTS}"
    if net is None:
        if moments is None:
            raise DataError(f"{path}: no precomputed mu/sigma; pass a feature net to use arr_0")
        # Our Inception port stands in for the TF graph these moments came from; say so.
        net_name = InceptionV3FID.name if moments.mu.shape[0] == 2048 else ""
        return FeatureStats(
            mu=moments.mu,
            sigma=moments.sigma,
            mu_s=moments.mu_s,
            sigma_s=moments.sigma_s,
            net=net_name,
            source=str(path),
            moments_net=ADM_MOMENTS,
            moments_source=precomputed,
        )
    if use_file_moments:
        if moments is None:
            raise DataError(f"{path}: use_file_moments is set but the file has no mu/sigma")
        if net.name != InceptionV3FID.name:
            raise ConfigError(
                f"{path}: the precomputed mu/sigma are TF Inception statistics; they cannot be "
                f"compared with {net.name} features (recompute them instead)"
            )
    feats = extract_features(
        net, iter_adm_images(load_adm_images(path), batch_size), keep_logits=False, device=device
    )
    if not use_file_moments:
        return FeatureStats(
            mu=feats.mu,
            sigma=feats.sigma,
            num_samples=feats.count,
            features=feats.pool,
            mu_s=feats.mu_s,
            sigma_s=feats.sigma_s,
            net=net.name,
            source=str(path),
            moments_source=f"recomputed from arr_0 of {path} with {net.name}",
        )
    assert moments is not None
    if moments.mu.shape != feats.mu.shape:
        raise DataError(
            f"{path}: mu has {moments.mu.shape[0]} dims but {net.name} gives {feats.mu.shape[0]}"
        )
    spatial_from_file = moments.mu_s is not None and moments.sigma_s is not None
    return FeatureStats(
        mu=moments.mu,
        sigma=moments.sigma,
        num_samples=moments.num_samples,
        features=feats.pool,
        mu_s=moments.mu_s if spatial_from_file else feats.mu_s,
        sigma_s=moments.sigma_s if spatial_from_file else feats.sigma_s,
        net=net.name,
        source=str(path),
        moments_net=ADM_MOMENTS,
        moments_source=f"{precomputed}; KID/PR features from arr_0 with {net.name}",
    )
