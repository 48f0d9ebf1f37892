"""Evaluation: feature networks (packaged classifiers, FID Inception-v3) and sample metrics.

"FD" is the Fréchet distance in a packaged classifier's feature space; "FID" only when the
features come from :class:`InceptionV3FID` with the user's pytorch-fid weights.
"""

from __future__ import annotations

from tread.eval.adm import (
    adm_reference_stats,
    iter_adm_images,
    load_adm_images,
    reference_file_kind,
)
from tread.eval.classifiers import (
    ClassifierConfig,
    SmallCNN,
    build_classifier,
    classifier_info,
    load_classifier,
)
from tread.eval.evaluate import (
    DEFAULT_METRICS,
    MetricName,
    compute_metrics,
    extract_features,
    finite_metrics,
    min_samples_for_fd,
    reference_stats,
    sample_size_warnings,
)
from tread.eval.features import FeatureNet, FeatureOutput, quantize_uint8
from tread.eval.inception import InceptionV3FID, inception_weights_from_env, load_inception
from tread.eval.metrics import (
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from tread.eval.stats import FeatureStats, feature_stats, load_stats, save_stats

__all__ = [
    "DEFAULT_METRICS",
    "ClassifierConfig",
    "FeatureNet",
    "FeatureOutput",
    "FeatureStats",
    "InceptionV3FID",
    "MetricName",
    "SmallCNN",
    "adm_reference_stats",
    "build_classifier",
    "classifier_info",
    "compute_metrics",
    "extract_features",
    "feature_stats",
    "finite_metrics",
    "frechet_distance",
    "inception_score",
    "inception_weights_from_env",
    "iter_adm_images",
    "kid",
    "load_adm_images",
    "load_classifier",
    "load_inception",
    "load_stats",
    "min_samples_for_fd",
    "precision_recall",
    "quantize_uint8",
    "reference_file_kind",
    "reference_stats",
    "sample_size_warnings",
    "save_stats",
]
