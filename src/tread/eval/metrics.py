"""Sample-quality metrics over plain feature arrays: Fréchet distance, KID, precision/recall, IS.

Everything here is network-agnostic: inputs are float numpy arrays or torch tensors of features,
logits or probabilities, computed in float64. Which network produced the features decides the
metric's name: Inception-v3 pool features give FID, the packaged small classifiers give "FD".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import log_softmax

from tread.errors import ConfigError, DataError
from tread.eval.stats import (
    ArrayLike,
    FeatureStats,
    as_float64,
    feature_stats,
    load_stats,
    save_stats,
)

__all__ = [
    "FeatureStats",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "kid",
    "load_stats",
    "precision_recall",
    "save_stats",
]


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; negative rounding-noise eigenvalues -> 0."""
    eigvals, eigvecs = np.linalg.eigh(a)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖mu1 − mu2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½)  (Heusel et al. 2017, eq. 6).

    The trace term avoids ``scipy.linalg.sqrtm`` on the non-symmetric product Σ1Σ2, whose
    iterative solver can return complex or badly wrong results for near-singular covariances
    (a known source of irreproducible FIDs). Instead: Σ1Σ2 is similar to the symmetric PSD
    matrix M = Σ1^½ Σ2 Σ1^½, so tr((Σ1Σ2)^½) = Σ_i sqrt(λ_i(M)). Both Σ1^½ and λ(M) come from
    ``eigh`` on symmetric matrices, which is backward-stable and always real; eigenvalues that
    rounding pushes below zero are clamped to 0. This is exact for singular covariances too.

    Args:
        mu1: (F,) mean of the first set.
        sigma1: (F, F) covariance of the first set.
        mu2: (F,) mean of the second set.
        sigma2: (F, F) covariance of the second set.

    Returns:
        The squared Fréchet distance (the quantity reported as FID), >= 0.
    """
    m1, m2 = as_float64(mu1, "mu1"), as_float64(mu2, "mu2")
    s1, s2 = as_float64(sigma1, "sigma1"), as_float64(sigma2, "sigma2")
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise DataError(f"mu1 {m1.shape} and mu2 {m2.shape} must be vectors of the same size")
    f = m1.shape[0]
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise DataError(f"sigma1 {s1.shape} and sigma2 {s2.shape} must both be ({f}, {f})")
    s1, s2 = _sym(s1), _sym(s2)  # remove asymmetric rounding noise from np.cov / file round-trips
    root1 = _psd_sqrt(s1)
    eig_m = np.linalg.eigvalsh(_sym(root1 @ s2 @ root1))
    tr_covmean = float(np.sqrt(np.clip(eig_m, 0.0, None)).sum())
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    if not np.isfinite(fd):
        raise DataError("Fréchet distance is not finite; check the feature statistics")
    # Rounding can make a true 0 (identical statistics) come out as -1e-12; the distance is >= 0.
    return max(fd, 0.0)


def kid(
    feats1: ArrayLike,
    feats2: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with k(x, y) = (xᵀy / F + 1)³ (Bińkowski et al.
    2018), averaged over random subsets.

    Args:
        feats1: (N1, F) features of the first set.
        feats2: (N2, F) features of the second set.
        subsets: number of random subset pairs.
        subset_size: samples per subset; reduced to min(N1, N2) if larger.
        seed: seed of the numpy generator that draws the subsets.

    Returns:
        (mean, std) of the per-subset MMD² estimates; the mean can be slightly negative.
    """
    x, y = as_float64(feats1, "feats1"), as_float64(feats2, "feats2")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DataError(f"feats1 {x.shape} and feats2 {y.shape} must be (N, F) with the same F")
    if subsets < 1:
        raise ConfigError(f"kid subsets must be >= 1, got {subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise DataError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    dim = x.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]  # (m, F)
        b = y[rng.choice(y.shape[0], m, replace=False)]  # (m, F)
        k_aa = (a @ a.T / dim + 1.0) ** 3
        k_bb = (b @ b.T / dim + 1.0) ** 3
        k_ab = (a @ b.T / dim + 1.0) ** 3
        # Unbiased: the within-set sums skip the diagonal k(x_i, x_i).
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_ab.mean()
    return float(estimates.mean()), float(estimates.std())


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (Na, F), (Nb, F) -> (Na, Nb), clamped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_sq_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour within x (self excluded)."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        d = _sq_dists(x[start : start + batch_size], x)  # (b, N)
        # Column 0 of the sorted row is the point itself (distance 0), so index k is the k-th NN.
        radii[start : start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside_any(query: np.ndarray, ref: np.ndarray, sq_radii: np.ndarray, batch_size: int):
    """Whether each query point lies inside at least one ball (ref_i, radius_i). -> (Nq,) bool."""
    inside = np.empty(query.shape[0], dtype=bool)
    for start in range(0, query.shape[0], batch_size):
        d = _sq_dists(query[start : start + batch_size], ref)  # (b, Nref)
        inside[start : start + batch_size] = (d <= sq_radii[None, :]).any(axis=1)
    return inside


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = 512
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, section 2).

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set. Precision is the share of fake points inside the
    real manifold; recall is the share of real points inside the fake manifold.

    Args:
        real: (Nr, F) real features, Nr > k.
        fake: (Nf, F) generated features, Nf > k.
        k: neighbourhood size (the paper uses 3).
        batch_size: rows per block of the distance matrix (memory ~ batch_size * N * 8 bytes).

    Returns:
        (precision, recall), each in [0, 1].
    """
    r, f = as_float64(real, "real"), as_float64(fake, "fake")
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise DataError(f"real {r.shape} and fake {f.shape} must be (N, F) with the same F")
    if k < 1 or min(r.shape[0], f.shape[0]) <= k:
        raise DataError(f"precision/recall needs k >= 1 and more than k={k} samples per set")
    precision = _inside_any(f, r, _knn_sq_radii(r, k, batch_size), batch_size).mean()
    recall = _inside_any(r, f, _knn_sq_radii(f, k, batch_size), batch_size).mean()
    return float(precision), float(recall)


def inception_score(
    values: ArrayLike, splits: int = 10, *, kind: Literal["logits", "probs"] = "logits"
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) ‖ p(y))) over `splits` disjoint parts (Salimans et al.
    2016), with p(y) the mean prediction of each part.

    Args:
        values: (N, K) classifier logits, or probabilities if kind="probs".
        splits: number of parts; the score is computed per part.
        kind: whether `values` are logits (softmaxed here) or probabilities (rows sum to 1).

    Returns:
        (mean, std) over the parts; 1 <= IS <= K.
    """
    v = as_float64(values, "values")
    if v.ndim != 2:
        raise DataError(f"inception_score expects (N, K) values, got {v.shape}")
    if not 1 <= splits <= v.shape[0]:
        raise ConfigError(f"inception_score splits must be in [1, N={v.shape[0]}], got {splits}")
    if kind == "logits":
        log_p = log_softmax(v, axis=1)
    elif kind == "probs":
        if v.min() < 0 or not np.allclose(v.sum(1), 1.0, atol=1e-4):
            raise DataError("inception_score kind='probs' needs non-negative rows summing to 1")
        with np.errstate(divide="ignore"):
            log_p = np.log(v / v.sum(1, keepdims=True))
    else:
        raise ConfigError(f"inception_score kind must be 'logits' or 'probs', got {kind!r}")
    p = np.exp(log_p)
    scores = []
    for part in np.array_split(np.arange(v.shape[0]), splits):
        p_y = p[part].mean(axis=0)  # (K,) marginal of this part
        with np.errstate(divide="ignore", invalid="ignore"):
            # 0 * log 0 = 0: classes a sample gives zero probability contribute nothing.
            terms = np.where(p[part] > 0, p[part] * (log_p[part] - np.log(p_y)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
