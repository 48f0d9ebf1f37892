"""Metric invariants and closed forms: FD, KID, precision/recall, IS, batch-size independence."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from tread.errors import ConfigError, DataError
from tread.eval import (
    FeatureNet,
    FeatureOutput,
    FeatureStats,
    compute_metrics,
    extract_features,
    feature_stats,
    finite_metrics,
    frechet_distance,
    inception_score,
    kid,
    load_stats,
    min_samples_for_fd,
    precision_recall,
    quantize_uint8,
    sample_size_warnings,
    save_stats,
)
from tread.eval.stats import MomentAccumulator


def _gaussian(rng: np.random.Generator, n: int, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return mu + rng.standard_normal((n, mu.shape[0])) * np.sqrt(var)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---------------------------------------------------------------- Fréchet distance


def test_fd_of_a_set_with_itself_is_zero() -> None:
    feats = np.random.default_rng(0).standard_normal((500, 32))
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fd_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_full_covariance_matches_sqrtm_reference() -> None:
    # Independent reference: the textbook formula with scipy's sqrtm on well-conditioned inputs.
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 20), _random_spd(rng, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fd_from_samples_approaches_closed_form() -> None:
    rng = np.random.default_rng(3)
    mu1, mu2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 1.0, 1.5, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    m1, s1 = feature_stats(_gaussian(rng, 40_000, mu1, v1))
    m2, s2 = feature_stats(_gaussian(rng, 40_000, mu2, v2))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, abs=0.05)


def test_fd_accepts_torch_tensors() -> None:
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(3.0)


@pytest.mark.parametrize("case", ["rank_deficient", "tiny_eigenvalues", "one_zero_cov"])
def test_fd_near_singular_is_finite_real_and_nonnegative(case: str) -> None:
    rng = np.random.default_rng(4)
    dim = 64
    if case == "rank_deficient":  # fewer samples than dims: covariance rank <= 9
        s1 = feature_stats(rng.standard_normal((10, dim)))[1]
        s2 = feature_stats(rng.standard_normal((10, dim)) * 2)[1]
    elif case == "tiny_eigenvalues":
        q = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        s1 = (q * np.logspace(-14, 0, dim)) @ q.T
        s2 = (q[::-1] * np.logspace(-14, 0, dim)) @ q[::-1].T
    else:
        s1, s2 = np.zeros((dim, dim)), _random_spd(rng, dim)
    mu = np.zeros(dim)
    fd = frechet_distance(mu, s1, mu, s2)
    assert isinstance(fd, float) and np.isfinite(fd) and fd >= 0.0
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-6)
    if case == "one_zero_cov":  # closed form: tr(s2) when s1 = 0
        assert fd == pytest.approx(np.trace(s2), rel=1e-10)


def test_fd_rejects_nan_and_bad_shapes() -> None:
    sigma = np.eye(3)
    with pytest.raises(DataError):
        frechet_distance(np.array([0.0, np.nan, 0.0]), sigma, np.zeros(3), sigma)
    with pytest.raises(DataError):
        frechet_distance(np.zeros(3), sigma, np.zeros(4), np.eye(4))


def test_moment_accumulator_matches_numpy_cov() -> None:
    x = np.random.default_rng(5).standard_normal((103, 7)) + 50.0  # large mean: stability check
    acc = MomentAccumulator()
    for start in range(0, 103, 10):
        acc.update(x[start : start + 10])
    mu, sigma = acc.result()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- KID


def test_kid_same_distribution_is_near_zero_and_shifted_is_positive() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    mean, std = kid(a, b, subsets=50, subset_size=200, seed=0)
    assert abs(mean) < 3 * std
    mean_shift, std_shift = kid(a, b + 1.0, subsets=50, subset_size=200, seed=0)
    assert mean_shift > 3 * std_shift > 0
    assert kid(a, b, subsets=5, subset_size=100, seed=1) == kid(a, b, 5, 100, seed=1)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets() -> None:
    real = np.random.default_rng(7).standard_normal((300, 8))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_away_fake() -> None:
    real = np.random.default_rng(8).standard_normal((300, 8))
    assert precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_made_points() -> None:
    # Real points 0..9 on a line: with k=1 every real ball has radius 1 and covers [-1, 10].
    real = np.arange(10, dtype=float)[:, None]
    # Fake: one point inside the real manifold, one far outside. The two fake points are 99.5
    # apart, so each fake ball (k=1) has radius 99.5 and covers all real points.
    fake = np.array([[0.5], [100.0]])
    precision, recall = precision_recall(real, fake, k=1, batch_size=3)
    assert precision == 0.5
    assert recall == 1.0
    # Fake points bunched together: tiny fake radii, so only real points near them are recalled.
    fake_tight = np.array([[2.0], [2.01], [2.02]])
    precision, recall = precision_recall(real, fake_tight, k=1)
    assert precision == 1.0 and recall == pytest.approx(0.1)


# ---------------------------------------------------------------- Inception Score


def test_inception_score_uniform_one_hot_equals_k() -> None:
    k, splits = 10, 5
    probs = np.tile(np.eye(k), (splits, 1))  # each split holds every class once
    mean, std = inception_score(probs, splits=splits, kind="probs")
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    logits = np.tile(np.eye(k) * 1e4, (splits, 1))  # softmax of these is one-hot
    assert inception_score(logits, splits=splits)[0] == pytest.approx(k, rel=1e-9)


def test_inception_score_constant_prediction_is_one() -> None:
    probs = np.tile(np.array([0.7, 0.2, 0.1]), (60, 1))
    assert inception_score(probs, splits=3, kind="probs")[0] == pytest.approx(1.0)
    assert inception_score(np.zeros((60, 5)), splits=3)[0] == pytest.approx(1.0)


def test_inception_score_rejects_non_probabilities() -> None:
    with pytest.raises(DataError):
        inception_score(np.full((10, 4), 0.5), splits=2, kind="probs")


# ---------------------------------------------------------------- stats files


def test_stats_roundtrip(tmp_path) -> None:
    rng = np.random.default_rng(9)
    stats = FeatureStats(
        mu=rng.standard_normal(4),
        sigma=np.eye(4),
        num_samples=12,
        features=rng.standard_normal((12, 4)).astype(np.float32),
        mu_s=np.zeros(2),
        sigma_s=np.eye(2),
        net="toy",
        source="unit:test",
    )
    loaded = load_stats(save_stats(stats, tmp_path / "sub" / "ref"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.features, stats.features)
    np.testing.assert_array_equal(loaded.sigma_s, stats.sigma_s)
    assert (loaded.num_samples, loaded.net, loaded.source) == (12, "toy", "unit:test")


# ---------------------------------------------------------------- compute_metrics


class ToyNet(nn.Module):
    """A tiny random conv net standing in for a feature network."""

    name = "toy"
    input_size = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 5)
        self.spatial_proj = nn.Conv2d(8, 2, 1)

    def forward(self, images: torch.Tensor) -> FeatureOutput:
        h = torch.relu(self.conv(images))  # (B, 8, 8, 8)
        pool = nn.functional.avg_pool2d(h, 2).flatten(1)  # (B, 8·4·4)
        spatial = self.spatial_proj(h).flatten(1)  # (B, 2·8·8)
        return FeatureOutput(pool=pool, logits=self.head(pool), spatial=spatial)


def _toy_data(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 8, 8, generator=gen) * 1.6 - 0.8 + shift).clamp(-1, 1)
    return images, torch.randint(0, 5, (n,), generator=gen)


ALL = ("fd", "sfid", "kid", "pr", "is", "acc")


def test_compute_metrics_independent_of_batch_size_and_input_form() -> None:
    net = ToyNet().eval()
    assert isinstance(net, FeatureNet)
    fake, labels = _toy_data(150, seed=1)
    real, _ = _toy_data(200, seed=2)
    kw = dict(kid_subsets=10, kid_subset_size=50, is_splits=3)
    small = compute_metrics(fake, net, real, labels, ALL, batch_size=7, **kw)
    large = compute_metrics(fake, net, real, labels, ALL, batch_size=64, **kw)
    batches = [(fake[i : i + 33], labels[i : i + 33]) for i in range(0, 150, 33)]
    streamed = compute_metrics(iter(batches), net, real, metrics=ALL, batch_size=64, **kw)
    assert set(small) == {
        "num_samples",
        "fd",
        "sfid",
        "kid_mean",
        "kid_std",
        "precision",
        "recall",
        "is_mean",
        "is_std",
        "acc",
    }
    for key in small:
        assert small[key] == pytest.approx(large[key], rel=1e-6, abs=1e-9), key
        assert small[key] == pytest.approx(streamed[key], rel=1e-6, abs=1e-9), key
    expected_acc = float((net(fake)["logits"].argmax(1) == labels).float().mean())
    assert small["acc"] == pytest.approx(expected_acc)


def test_compute_metrics_separates_same_from_shifted_distribution() -> None:
    net = ToyNet().eval()
    real, _ = _toy_data(300, seed=3)
    same, _ = _toy_data(300, seed=4)
    shifted, _ = _toy_data(300, seed=5, shift=0.5)
    ref = compute_metrics(real, net, real, metrics=("fd",))
    assert ref["fd"] == pytest.approx(0.0, abs=1e-6)
    close = compute_metrics(same, net, real, metrics=("fd", "pr"))
    far = compute_metrics(shifted, net, real, metrics=("fd", "pr"))
    assert far["fd"] > 5 * close["fd"]
    assert close["precision"] > far["precision"]
    assert "acc" not in close  # no labels -> no conditional accuracy


def test_compute_metrics_errors() -> None:
    net = ToyNet().eval()
    fake, _ = _toy_data(20, seed=6)
    stats = FeatureStats(mu=np.zeros(128), sigma=np.eye(128), net="other_net")
    with pytest.raises(ConfigError):
        compute_metrics(fake, net, fake, metrics=("fid",))
    with pytest.raises(DataError):  # stats of a different network
        compute_metrics(fake, net, stats, metrics=("fd",))
    no_feats = FeatureStats(mu=np.zeros(128), sigma=np.eye(128), net="toy")
    with pytest.raises(DataError):  # KID needs reference features
        compute_metrics(fake, net, no_feats, metrics=("kid",))
    with pytest.raises(DataError):  # [0, 255] images
        compute_metrics(fake * 255, net, no_feats, metrics=("fd",))


# ---------------------------------------------------------------- uint8 quantisation


def test_features_are_those_of_the_uint8_quantised_images() -> None:
    # What ADM / pytorch-fid score is the saved uint8 image, so the float sample must not
    # reach the net: features of a batch equal those of its quantised version.
    net = ToyNet().eval()
    images, _ = _toy_data(40, seed=11)  # uniform floats: almost none on the uint8 grid
    default = extract_features(net, images)
    grid = extract_features(net, quantize_uint8(images), quantize=False)
    raw = extract_features(net, images, quantize=False)
    np.testing.assert_array_equal(default.pool, grid.pool)
    np.testing.assert_array_equal(default.mu, grid.mu)
    assert np.abs(default.pool - raw.pool).max() > 1e-4  # sub-level detail changed features
    # The same holds through compute_metrics, for the generated and the reference side.
    real, _ = _toy_data(60, seed=12)
    fd = compute_metrics(images, net, real, metrics=("fd",))["fd"]
    fd_grid = compute_metrics(
        quantize_uint8(images), net, quantize_uint8(real), metrics=("fd",), quantize=False
    )["fd"]
    fd_raw = compute_metrics(images, net, real, metrics=("fd",), quantize=False)["fd"]
    assert fd == fd_grid and fd != fd_raw


def test_quantize_uint8_levels_and_exactness_on_uint8_images() -> None:
    from tread.eval.adm import uint8_nhwc_to_float

    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = uint8_nhwc_to_float(levels)
    # Already on the grid: unchanged bit for bit (ADM batches and uint8 datasets), idempotent.
    assert torch.equal(quantize_uint8(x), x)
    back = torch.round((quantize_uint8(x) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(back.numpy(), levels)
    # Round to nearest level, clamp overshoot, as DiT's sample_ddp.py writes PNGs.
    y = torch.tensor([-1.3, -1.0, -0.999, 0.0, 0.5 / 127.5 - 1 + 1e-4, 1.0, 1.2])
    want = torch.tensor([0, 0, 0, 128, 1, 255, 255]) / 127.5 - 1
    torch.testing.assert_close(quantize_uint8(y), want, rtol=0, atol=0)


# ---------------------------------------------------------------- cache files


def _hammer_stats(path: str, value: float, rounds: int) -> None:
    for _ in range(rounds):
        save_stats(FeatureStats(mu=np.full(64, value), sigma=np.eye(64) * value), path)


def test_stats_cache_temp_names_are_per_process_and_the_file_stays_complete(tmp_path) -> None:
    import multiprocessing
    import os

    from tread.paths import temporary_name

    target = tmp_path / "ref.npz"
    names = {temporary_name(target) for _ in range(2)}
    assert len(names) == 2  # two writers in one process differ too (random suffix)
    assert all(str(os.getpid()) in n.name and n.parent == tmp_path for n in names)
    # Two processes write the same cache at once (as every rank did): with one shared temp
    # name one truncates or renames away the other's file; here every write is complete.
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_hammer_stats, args=(str(target), v, 30)) for v in (1.0, 2.0)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    loaded = load_stats(target)
    value = loaded.mu[0]
    assert value in (1.0, 2.0)
    np.testing.assert_array_equal(loaded.sigma, np.eye(64) * value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp files left


# ---------------------------------------------------------------- honest reports


def test_sample_size_warnings_follow_the_feature_dimension() -> None:
    assert min_samples_for_fd(2048) == 2048 and min_samples_for_fd(128) == 128
    ref = FeatureStats(
        mu=np.zeros(128), sigma=np.eye(128), num_samples=10_000, mu_s=np.zeros(300), sigma_s=None
    )
    assert sample_size_warnings(128, ref, ("fd", "kid")) == []
    (message,) = sample_size_warnings(127, ref, ("fd",))
    assert message.startswith("fd: 127 generated samples < 128")
    assert sample_size_warnings(127, ref, ("kid", "pr")) == []  # only FD-type metrics
    assert [m[:4] for m in sample_size_warnings(200, ref, ("fd", "sfid"))] == ["sfid"]
    small_ref = FeatureStats(mu=np.zeros(128), sigma=np.eye(128), num_samples=100)
    assert "reference has 100 samples" in sample_size_warnings(5000, small_ref, ("fd",))[0]


def test_finite_metrics_writes_null_not_nan() -> None:
    import json

    clean, warnings = finite_metrics({"fd": 3.0, "kid_mean": float("nan"), "is": float("inf")})
    assert clean == {"fd": 3.0, "kid_mean": None, "is": None}
    assert len(warnings) == 2 and "kid_mean is nan" in warnings[0]
    assert json.loads(json.dumps(clean, allow_nan=False)) == clean
