"""Feature statistics (mean, covariance, kept features) and their ``.npz`` cache files.

The file layout uses ADM's key names (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) so a stats file
written here can be read by ADM-style tools and vice versa.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from tread.errors import DataError
from tread.paths import atomic_open

ArrayLike = np.ndarray | torch.Tensor


def as_float64(x: ArrayLike, what: str = "array") -> np.ndarray:
    """Convert a numpy array or torch tensor to a float64 numpy array and check it is finite.

    Args:
        x: array or tensor of any shape.
        what: name used in the error message.

    Returns:
        float64 numpy array with the same shape.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise DataError(f"{what} contains NaN or inf values")
    return out


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature matrix.

    Args:
        features: (N, F) features, N >= 2.

    Returns:
        mu (F,) and sigma (F, F), float64.
    """
    feats = as_float64(features, "features")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise DataError(f"features must have shape (N>=2, F), got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], -1)


class MomentAccumulator:
    """Streaming mean and covariance, merged batch by batch in float64 (Chan et al. 1979).

    Merging centred sums instead of accumulating raw ``x x^T`` keeps the covariance accurate when
    the mean is large compared with the spread, and makes the result independent of how the
    samples are split into batches (up to float64 rounding).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None  # (F,)
        self.m2: np.ndarray | None = None  # (F, F) sum of centred outer products

    def update(self, batch: ArrayLike) -> None:
        """Add a batch of features.

        Args:
            batch: (B, F) features.
        """
        x = as_float64(batch, "features")
        if x.ndim != 2:
            raise DataError(f"features must have shape (B, F), got {x.shape}")
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if self.mean.shape != mean_b.shape:
            raise DataError(f"feature dim changed from {self.mean.shape[0]} to {mean_b.shape[0]}")
        n = self.count + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Return mu (F,) and the unbiased covariance sigma (F, F)."""
        if self.mean is None or self.m2 is None or self.count < 2:
            raise DataError(f"need at least 2 samples for a covariance, got {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


@dataclass(frozen=True)
class FeatureStats:
    """Reference statistics of one feature network over one image set.

    Attributes:
        mu: (F,) mean of the pooled features.
        sigma: (F, F) covariance of the pooled features.
        num_samples: number of images the moments were computed from (0 if unknown).
        features: (M, F) pooled features kept for KID and precision/recall, or None.
        mu_s: (F2,) mean of the spatial features (sFID), or None.
        sigma_s: (F2, F2) covariance of the spatial features, or None.
        net: name of the feature network whose features these stats are compared with ("" if
            unknown). compute_metrics refuses stats of another net.
        source: free-form description of the images, e.g. "fashion_mnist:test (uint8)".
        moments_net: the network that produced mu/sigma when it is not `net` (e.g. ADM's TF
            Inception graph for an ADM batch's precomputed moments); "" = `net`.
        moments_source: how mu/sigma were obtained, e.g. "computed from fashion_mnist:test with
            fashion_mnist_classifier" or "precomputed in <file> (ADM evaluator, TF Inception)";
            recorded in eval JSONs so a reader knows which network produced the reference side.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int = 0
    features: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    net: str = ""
    source: str = ""
    moments_net: str = ""
    moments_source: str = ""


def save_stats(stats: FeatureStats, path: str | PathLike[str]) -> Path:
    """Write statistics to an uncompressed ``.npz`` file (parent folders are created).

    Args:
        stats: the statistics to save.
        path: destination; ``.npz`` is appended by numpy if missing.

    Returns:
        The path actually written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "mu": np.asarray(stats.mu, np.float64),
        "sigma": np.asarray(stats.sigma, np.float64),
        "num_samples": np.asarray(stats.num_samples, np.int64),
        "net": np.asarray(stats.net),
        "source": np.asarray(stats.source),
        "moments_net": np.asarray(stats.moments_net),
        "moments_source": np.asarray(stats.moments_source),
    }
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    if stats.mu_s is not None and stats.sigma_s is not None:
        arrays["mu_s"] = np.asarray(stats.mu_s, np.float64)
        arrays["sigma_s"] = np.asarray(stats.sigma_s, np.float64)
    # A per-process temporary name + os.replace: an interrupted run never leaves a truncated
    # cache, and ranks writing the same cache at once never clobber each other's temp file.
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)
    return path


def _check_moments(mu: np.ndarray, sigma: np.ndarray, path: Path, suffix: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(
            f"{path}: mu{suffix} {mu.shape} and sigma{suffix} {sigma.shape} are not (F,), (F, F)"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise DataError(f"{path}: mu{suffix}/sigma{suffix} contain NaN or inf")


def load_stats(path: str | PathLike[str]) -> FeatureStats:
    """Read statistics written by :func:`save_stats` or an ADM reference batch's ``mu``/``sigma``.

    Args:
        path: ``.npz`` file with at least ``mu`` (F,) and ``sigma`` (F, F).

    Returns:
        The statistics; fields absent from the file are None / empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"stats file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise DataError(f"{path}: not a stats file (needs keys 'mu' and 'sigma')")
            arrays = {k: data[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: unreadable stats file ({type(err).__name__}: {err})") from err

    mu = np.asarray(arrays["mu"], np.float64)
    sigma = np.asarray(arrays["sigma"], np.float64)
    _check_moments(mu, sigma, path, "")
    mu_s = sigma_s = None
    if "mu_s" in arrays and "sigma_s" in arrays:
        mu_s = np.asarray(arrays["mu_s"], np.float64)
        sigma_s = np.asarray(arrays["sigma_s"], np.float64)
        _check_moments(mu_s, sigma_s, path, "_s")
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise DataError(f"{path}: features {features.shape} do not match mu {mu.shape}")
    return FeatureStats(
        mu=mu,
        sigma=sigma,
        num_samples=int(arrays["num_samples"]) if "num_samples" in arrays else 0,
        features=features,
        mu_s=mu_s,
        sigma_s=sigma_s,
        net=str(arrays["net"]) if "net" in arrays else "",
        source=str(arrays["source"]) if "source" in arrays else "",
        moments_net=str(arrays["moments_net"]) if "moments_net" in arrays else "",
        moments_source=str(arrays["moments_source"]) if "moments_source" in arrays else "",
    )
