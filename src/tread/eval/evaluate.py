"""Batched feature extraction and the metric suite over generated images.

Generation stays outside: callers pass images (a tensor/array, or an iterator of batches so N can
be larger than memory) produced by the sampler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from tread.errors import ConfigError, DataError
from tread.eval.features import FeatureNet, quantize_uint8
from tread.eval.metrics import frechet_distance, inception_score, kid, precision_recall
from tread.eval.stats import FeatureStats, MomentAccumulator, load_stats, save_stats

logger = logging.getLogger(__name__)

MetricName = Literal["fd", "sfid", "kid", "pr", "is", "acc"]
DEFAULT_METRICS: tuple[MetricName, ...] = ("fd", "kid", "pr", "is", "acc")

Batch = torch.Tensor | np.ndarray | tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]
ImageSource = torch.Tensor | np.ndarray | Iterable[Batch]

# Images are expected in [-1, 1]; a little slack tolerates sampler overshoot, while [0, 255]
# inputs (a silent metric-ruining mistake) fail the range check. [0, 1] inputs cannot be told
# apart from legitimately bright [-1, 1] images and are the caller's responsibility.
_RANGE_SLACK = 0.05


@dataclass
class ExtractedFeatures:
    """Everything `compute_metrics` needs from one image set.

    Attributes:
        count: number of images.
        mu, sigma: (F,), (F, F) moments of the pooled features.
        mu_s, sigma_s: moments of the spatial features, or None.
        pool: (N, F) float32 pooled features if kept, else None.
        logits: (N, K) float32 logits if kept, else None.
        correct: images whose argmax equals their label (0 without labels).
        labelled: images that came with a label.
    """

    count: int
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None
    logits: np.ndarray | None
    correct: int
    labelled: int


def iter_batches(
    source: ImageSource, labels: torch.Tensor | np.ndarray | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (images (B, C, H, W) float32, labels (B,) int64 or None) batches.

    Args:
        source: a (N, C, H, W) tensor/array, or an iterable of image batches or (images, labels).
        labels: (N,) labels for an in-memory `source`; must be None for an iterable.
        batch_size: batch size for an in-memory `source`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(source)
        y = None if labels is None else torch.as_tensor(labels).long()
        if y is not None and y.shape != (images.shape[0],):
            raise DataError(f"labels {tuple(y.shape)} do not match {images.shape[0]} images")
        for start in range(0, images.shape[0], batch_size):
            stop = start + batch_size
            yield images[start:stop].float(), None if y is None else y[start:stop]
        return
    if labels is not None:
        raise ConfigError("pass labels inside the batches when the images come as an iterator")
    for item in source:
        if isinstance(item, (tuple, list)):
            img, lab = item
            yield torch.as_tensor(img).float(), torch.as_tensor(lab).long()
        else:
            yield torch.as_tensor(item).float(), None


def _net_device(net: FeatureNet) -> torch.device:
    params = getattr(net, "parameters", None)
    first = next(iter(params()), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    net: FeatureNet,
    source: ImageSource,
    labels: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 64,
    *,
    keep_pool: bool = True,
    keep_logits: bool = True,
    quantize: bool = True,
    device: str | torch.device | None = None,
) -> ExtractedFeatures:
    """Run `net` over all images; moments are merged in float64 so the batch size does not matter.

    Args:
        net: feature network (in eval mode).
        source: images in [-1, 1]; see :func:`iter_batches`.
        labels: (N,) class labels for an in-memory `source` (conditional accuracy).
        batch_size: images per forward pass for an in-memory `source`.
        keep_pool: keep all pooled features (needed for KID and precision/recall).
        keep_logits: keep all logits (needed for IS).
        quantize: round the images to the uint8 grid first (:func:`quantize_uint8`), as the
            ADM suite and pytorch-fid see saved samples; False feeds the floats unchanged.
        device: where to run; default: the net's device.

    Returns:
        The :class:`ExtractedFeatures`.
    """
    device = torch.device(device) if device is not None else _net_device(net)
    pool_acc, spatial_acc = MomentAccumulator(), MomentAccumulator()
    pools: list[np.ndarray] = []
    logits_all: list[np.ndarray] = []
    correct = labelled = 0
    for images, y in iter_batches(source, labels, batch_size):
        if images.numel() == 0:
            continue
        lo, hi = float(images.min()), float(images.max())
        if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise DataError(f"images must be floats in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")
        if quantize:
            images = quantize_uint8(images)
        out = net(images.to(device))
        pool_acc.update(out["pool"])
        if out["spatial"] is not None:
            spatial_acc.update(out["spatial"])
        if keep_pool:
            pools.append(out["pool"].float().cpu().numpy())
        logits = out["logits"]
        if logits is not None:
            if keep_logits:
                logits_all.append(logits.float().cpu().numpy())
            if y is not None:
                correct += int((logits.argmax(dim=1).cpu() == y).sum())
                labelled += y.shape[0]
    mu, sigma = pool_acc.result()
    mu_s, sigma_s = spatial_acc.result() if spatial_acc.count else (None, None)
    return ExtractedFeatures(
        count=pool_acc.count,
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
        pool=np.concatenate(pools) if pools else None,
        logits=np.concatenate(logits_all) if logits_all else None,
        correct=correct,
        labelled=labelled,
    )


def _to_stats(
    feats: ExtractedFeatures, net_name: str, source: str, max_features: int | None
) -> FeatureStats:
    """Reference statistics from extracted features (KID/PR keep a fixed random subset)."""
    kept = feats.pool
    if kept is not None and max_features is not None and kept.shape[0] > max_features:
        # A fixed-seed random subset, not the first rows: datasets may be sorted by class.
        idx = np.sort(np.random.default_rng(0).choice(kept.shape[0], max_features, replace=False))
        kept = kept[idx]
    return FeatureStats(
        mu=feats.mu,
        sigma=feats.sigma,
        num_samples=feats.count,
        features=kept,
        mu_s=feats.mu_s,
        sigma_s=feats.sigma_s,
        net=net_name,
        source=source,
        moments_source=f"computed from {source} with {net_name}",
    )


def compute_metrics(
    fake: ImageSource,
    net: FeatureNet,
    reference: FeatureStats | ImageSource,
    labels: torch.Tensor | np.ndarray | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    seed: int = 0,
    quantize: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Evaluate generated images against a reference set with one feature network.

    Keys of the result: "fd" (Fréchet distance of pooled features: FID when `net` is the FID
    Inception, "FD" otherwise), "sfid", "kid_mean"/"kid_std", "precision"/"recall",
    "is_mean"/"is_std", "acc" (share of samples whose argmax equals the conditioning label),
    and "num_samples". "acc" is left out when no labels are given.

    Args:
        fake: generated images in [-1, 1]: (N, C, H, W) tensor/array or iterable of batches
            (images or (images, labels)).
        net: feature network, e.g. :func:`~tread.eval.classifiers.load_classifier` output.
        reference: statistics from :func:`reference_stats` / :func:`load_stats`, or real images.
        labels: (N,) conditioning labels of in-memory `fake` images.
        metrics: subset of ("fd", "sfid", "kid", "pr", "is", "acc").
        batch_size: images per forward pass (results do not depend on it).
        kid_subsets, kid_subset_size: KID subset sampling; seed: its RNG seed.
        pr_k: k of the k-NN radii in precision/recall.
        is_splits: number of splits for IS.
        quantize: round `fake` (and `reference` images) to the uint8 grid before the net, see
            :func:`~tread.eval.features.quantize_uint8`.
        device: where to run the net; default: the net's device.

    Returns:
        Metric name -> value.
    """
    wanted = tuple(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in get_args(MetricName)]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {get_args(MetricName)}")
    if isinstance(reference, FeatureStats):
        ref = reference
        if ref.net and ref.net != net.name:
            raise DataError(f"reference stats were computed with {ref.net!r}, not {net.name!r}")
    else:
        ref_feats = extract_features(
            net, reference, None, batch_size, keep_logits=False, quantize=quantize, device=device
        )
        ref = _to_stats(ref_feats, net.name, _image_source("images", quantize), None)

    need_pool = "kid" in wanted or "pr" in wanted
    if need_pool and ref.features is None:
        raise DataError("reference stats hold no features; KID and precision/recall need them")
    feats = extract_features(
        net,
        fake,
        labels,
        batch_size,
        keep_pool=need_pool,
        keep_logits="is" in wanted,
        quantize=quantize,
        device=device,
    )
    result: dict[str, float] = {"num_samples": float(feats.count)}
    if "fd" in wanted:
        result["fd"] = frechet_distance(feats.mu, feats.sigma, ref.mu, ref.sigma)
    if "sfid" in wanted:
        if feats.mu_s is None or feats.sigma_s is None:
            raise ConfigError(f"sfid needs spatial features, which {net.name!r} does not provide")
        if ref.mu_s is None or ref.sigma_s is None:
            raise DataError("reference stats hold no spatial moments (mu_s, sigma_s) for sfid")
        result["sfid"] = frechet_distance(feats.mu_s, feats.sigma_s, ref.mu_s, ref.sigma_s)
    if "kid" in wanted:
        assert feats.pool is not None and ref.features is not None
        result["kid_mean"], result["kid_std"] = kid(
            feats.pool, ref.features, kid_subsets, kid_subset_size, seed
        )
    if "pr" in wanted:
        assert feats.pool is not None and ref.features is not None
        result["precision"], result["recall"] = precision_recall(ref.features, feats.pool, pr_k)
    if "is" in wanted:
        if feats.logits is None:
            raise ConfigError(f"is needs logits, which {net.name!r} does not provide")
        result["is_mean"], result["is_std"] = inception_score(feats.logits, is_splits)
    if "acc" in wanted:
        if feats.labelled:
            result["acc"] = feats.correct / feats.labelled
        else:
            logger.debug("no labels given: conditional accuracy skipped")
    return result


def reference_stats(
    dataset_name: str,
    split: Literal["train", "test"],
    net: FeatureNet,
    cache_path: str | PathLike[str] | None = None,
    *,
    data_path: str | PathLike[str] | None = None,
    batch_size: int = 256,
    max_features: int | None = 10_000,
    quantize: bool = True,
    device: str | torch.device | None = None,
) -> FeatureStats:
    """Feature statistics of a real dataset split, cached to an ``.npz`` file.

    Args:
        dataset_name: a :func:`tread.data.load_dataset` name, e.g. "fashion_mnist".
        split: "train" or "test".
        net: feature network.
        cache_path: if the file exists it is loaded (and checked to match net and split);
            otherwise the stats are computed and written there. None: no caching.
        data_path: dataset location passed to ``load_dataset`` (None: its default).
        batch_size: images per forward pass.
        max_features: pooled features kept for KID / precision-recall (a fixed random subset
            when the split is larger); None keeps all.
        quantize: round the images to the uint8 grid first, like the generated side (datasets
            not stored as uint8, e.g. digits with 17 grey levels, change slightly).
        device: where to run the net.

    Returns:
        The :class:`FeatureStats`.
    """
    source = _image_source(f"{dataset_name}:{split}", quantize)
    if cache_path is not None and Path(cache_path).is_file():
        stats = load_stats(cache_path)
        if (stats.net, stats.source) != (net.name, source):
            raise DataError(
                f"{cache_path} holds stats of {stats.source!r} with {stats.net!r}, not {source!r} "
                f"with {net.name!r}; delete it or choose another cache path"
            )
        return stats
    from tread.data import load_dataset  # imported here: only this function needs the datasets

    data = load_dataset(dataset_name, path=data_path, split=split)
    feats = extract_features(
        net, data.images, None, batch_size, keep_logits=False, quantize=quantize, device=device
    )
    stats = _to_stats(feats, net.name, source, max_features)
    if cache_path is not None:
        save_stats(stats, cache_path)
    return stats


def _image_source(name: str, quantize: bool) -> str:
    # The preprocessing is part of the name, so a cache made without quantisation (older
    # versions) is refused instead of silently compared with quantised samples.
    return f"{name} (uint8)" if quantize else name


def min_samples_for_fd(feature_dim: int) -> int:
    """Fewest samples per side for which a Fréchet distance is reported without a warning.

    The rule is the feature dimension F: with N < F samples the F×F covariance estimate has
    rank at most N − 1, so it is singular and FD is dominated by its small-sample bias (FD is
    biased upward roughly in proportion to F / N). Inception's 2048-d pool features need
    N >= 2048 (the literature uses 10k–50k); the 128-d packaged classifiers need N >= 128.
    """
    return feature_dim


def sample_size_warnings(
    num_samples: int, reference: FeatureStats, metrics: Iterable[str]
) -> list[str]:
    """Warnings for FD/sFID computed from too few samples on either side (see docs).

    Args:
        num_samples: generated samples.
        reference: the reference statistics (their feature dimensions and sample count).
        metrics: the metrics asked for; only "fd" and "sfid" are checked.

    Returns:
        One message per problem (empty when the counts are large enough).
    """
    wanted = set(metrics)
    dims = {"fd": reference.mu.shape[0]}
    if reference.mu_s is not None:
        dims["sfid"] = reference.mu_s.shape[0]
    messages = []
    for metric, dim in dims.items():
        if metric not in wanted:
            continue
        need = min_samples_for_fd(dim)
        if num_samples < need:
            messages.append(
                f"{metric}: {num_samples} generated samples < {need} (the feature dimension): "
                "the covariance is singular and the distance is biased upward; compare it only "
                "with runs that use the same sample count"
            )
        if 0 < reference.num_samples < need:
            messages.append(
                f"{metric}: the reference has {reference.num_samples} samples < {need} (the "
                "feature dimension): its covariance is singular and the distance biased upward"
            )
    return messages


def finite_metrics(result: Mapping[str, float]) -> tuple[dict[str, float | None], list[str]]:
    """Replace non-finite metric values by None (JSON ``null``) and say which ones.

    ``json.dumps`` writes NaN/Infinity, which is not JSON; a reader would fail on the file.

    Returns:
        (the metrics with None for non-finite values, one warning per replaced value).
    """
    clean: dict[str, float | None] = {}
    warnings: list[str] = []
    for key, value in result.items():
        if math.isfinite(value):
            clean[key] = value
        else:
            clean[key] = None
            warnings.append(f"{key} is {value} (not finite): written as null")
    return clean, warnings
