"""Feature networks: packaged classifiers reach their targets, Inception loads strictly, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tread.data import load_dataset
from tread.errors import ConfigError, DataError
from tread.eval import (
    FeatureNet,
    InceptionV3FID,
    adm_reference_stats,
    classifier_info,
    compute_metrics,
    inception_weights_from_env,
    load_classifier,
    load_inception,
    load_stats,
    reference_stats,
    save_stats,
)
from tread.eval.adm import uint8_nhwc_to_float
from tread.eval.classifiers import weights_dir
from tread.eval.stats import FeatureStats

TARGETS = {"digits": 0.97, "fashion_mnist": 0.90}


def _load_test_split(name: str, **opts):
    try:
        return load_dataset(name, split="test", **opts)
    except DataError as err:  # Fashion-MNIST needs Debian's dataset-fashion-mnist files
        pytest.skip(f"{name} not available: {err}")


@torch.no_grad()
def _accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for start in range(0, images.shape[0], 2000):
        logits = net(images[start : start + 2000])["logits"]
        correct += int((logits.argmax(1) == labels[start : start + 2000]).sum())
    return correct / images.shape[0]


# ---------------------------------------------------------------- packaged classifiers


@pytest.mark.parametrize("name", list(TARGETS))
def test_packaged_classifier_reaches_target_on_test_split(name: str) -> None:
    data = _load_test_split(name)
    net = load_classifier(name)
    assert isinstance(net, FeatureNet) and not net.training
    acc = _accuracy(net, data.images, data.labels)
    assert acc >= TARGETS[name]
    # The JSON records the accuracy the training script measured on the same split.
    assert classifier_info(name)["test_accuracy"] == pytest.approx(acc, abs=1e-3)
    out = net(data.images[:4])
    assert out["pool"].shape == (4, 128) and out["logits"].shape == (4, 10)
    assert out["spatial"] is None


def test_fashion_classifier_accepts_32px_padded_input() -> None:
    data = _load_test_split("fashion_mnist", pad_to=32)
    assert data.images.shape[-1] == 32
    net = load_classifier("fashion_mnist")
    n = 2000  # a slice keeps the test fast; the full split is checked above at 28 px
    assert _accuracy(net, data.images[:n], data.labels[:n]) >= TARGETS["fashion_mnist"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_packaged_files_are_small_and_described(name: str) -> None:
    weights = weights_dir() / f"{name}_classifier.safetensors"
    assert weights.stat().st_size <= 1_100_000
    info = json.loads(weights.with_suffix(".json").read_text())
    assert {"architecture", "test_accuracy", "seed", "date", "machine"} <= set(info)


def test_unknown_classifier_is_config_error() -> None:
    with pytest.raises(ConfigError):
        load_classifier("cifar10")


def test_digits_classifier_rejects_wrong_channels() -> None:
    with pytest.raises(DataError):
        load_classifier("digits")(torch.zeros(2, 3, 8, 8))


def test_reference_stats_cache(tmp_path) -> None:
    net = load_classifier("digits")
    cache = tmp_path / "digits_test.npz"
    stats = reference_stats("digits", "test", net, cache)
    assert cache.is_file() and stats.num_samples == stats.features.shape[0]
    again = reference_stats("digits", "test", net, cache)
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    with pytest.raises(DataError):  # same cache file asked for another split
        reference_stats("digits", "train", net, cache)
    # Real test images score far better against the test stats than noise does.
    data = load_dataset("digits", split="test")
    real = compute_metrics(data.images, net, stats, data.labels, ("fd", "acc"))
    noise = compute_metrics(torch.rand_like(data.images) * 2 - 1, net, stats, metrics=("fd",))
    assert real["fd"] == pytest.approx(0.0, abs=1e-6) and real["acc"] >= 0.97
    assert noise["fd"] > 10.0


# ---------------------------------------------------------------- Inception-v3 (FID)


@pytest.fixture(scope="module")
def random_inception() -> InceptionV3FID:
    torch.manual_seed(0)
    return InceptionV3FID().eval()


def test_inception_layout_matches_pytorch_fid(random_inception: InceptionV3FID) -> None:
    state = random_inception.state_dict()
    # torchvision's inception_v3(aux_logits=False, num_classes=1008) has exactly this many
    # parameters; pytorch-fid's weights file is a state dict of that model.
    assert sum(p.numel() for p in random_inception.parameters()) == 23_850_960
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
        "fc.weight": (1008, 2048),
    }.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_inception_strict_roundtrip_and_shapes(random_inception, tmp_path, suffix) -> None:
    path = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(random_inception.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in random_inception.state_dict().items()}, path)
    loaded = load_inception(path)
    for key, value in random_inception.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = loaded(images)
        ref = random_inception(images)
    assert out["pool"].shape == (2, 2048)
    assert out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    torch.testing.assert_close(out["pool"], ref["pool"])


def test_inception_missing_or_wrong_weights(tmp_path, monkeypatch) -> None:
    with pytest.raises(DataError, match="TREAD_INCEPTION_WEIGHTS"):
        load_inception(None)
    with pytest.raises(DataError, match="not found"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DataError, match="not pytorch-fid"):
        load_inception(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError):
        load_inception(garbage)
    monkeypatch.setenv("TREAD_INCEPTION_WEIGHTS", str(wrong))
    assert inception_weights_from_env() == wrong
    monkeypatch.delenv("TREAD_INCEPTION_WEIGHTS")
    assert inception_weights_from_env() is None


# ---------------------------------------------------------------- stats files and ADM batches


def test_bad_stats_files_raise_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError):
        load_stats(garbage)
    no_keys = tmp_path / "no_keys.npz"
    np.savez(no_keys, something=np.zeros(3))
    with pytest.raises(DataError, match="mu"):
        load_stats(no_keys)
    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(DataError):
        load_stats(bad_shape)
    nan = tmp_path / "nan.npz"
    np.savez(nan, mu=np.full(2, np.nan), sigma=np.eye(2))
    with pytest.raises(DataError):
        load_stats(nan)


def test_adm_reference_batch(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_toy.npz"
    np.savez(
        path,
        arr_0=images,
        mu=np.ones(2048),
        sigma=np.eye(2048),
        mu_s=np.zeros(2023),
        sigma_s=np.eye(2023),
    )
    stats = adm_reference_stats(path)
    assert stats.net == InceptionV3FID.name and stats.mu.shape == (2048,)
    assert stats.mu_s.shape == (2023,) and stats.features is None
    x = uint8_nhwc_to_float(images)
    assert x.shape == (6, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert float(x[0, 2, 1, 3]) == pytest.approx(images[0, 1, 3, 2] / 127.5 - 1)

    # With another feature net the images are featurised and the file's Inception moments unused.
    class MeanNet(torch.nn.Module):
        name, input_size = "mean_net", (3, 8, 8)

        def forward(self, imgs):
            pool = imgs.mean(dim=(2, 3))  # (B, 3)
            return {"pool": pool, "logits": None, "spatial": None}

    own = adm_reference_stats(path, MeanNet(), batch_size=4)
    assert own.net == "mean_net" and own.features.shape == (6, 3) and own.num_samples == 6
    save_stats(FeatureStats(mu=own.mu, sigma=own.sigma), tmp_path / "s.npz")
    with pytest.raises(DataError):
        adm_reference_stats(tmp_path / "absent.npz")


class _MeanNet(torch.nn.Module):
    """Channel means as 3-d features: a cheap stand-in feature net."""

    name, input_size = "mean_net", (3, 8, 8)

    def forward(self, imgs):
        return {"pool": imgs.mean(dim=(2, 3)), "logits": None, "spatial": None}


def _adm_batch(tmp_path, dim: int = 3):
    images = np.random.default_rng(1).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_small.npz"
    # Deliberately wrong precomputed moments: they must not be used unless asked for.
    np.savez(path, arr_0=images, mu=np.full(dim, 50.0), sigma=np.eye(dim) * 9.0)
    return path, images


def test_adm_reference_moments_are_recomputed_with_the_same_net(tmp_path) -> None:
    path, images = _adm_batch(tmp_path)
    stats = adm_reference_stats(path, _MeanNet())
    expected = uint8_nhwc_to_float(images).mean(dim=(2, 3)).double().numpy()  # on the grid
    np.testing.assert_allclose(stats.mu, expected.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(expected, rowvar=False), rtol=1e-5)
    assert stats.net == "mean_net" and stats.moments_net == ""
    assert stats.moments_source == f"recomputed from arr_0 of {path} with mean_net"
    # The file's TF-Inception moments cannot stand in for another net's.
    with pytest.raises(ConfigError, match="TF Inception"):
        adm_reference_stats(path, _MeanNet(), use_file_moments=True)


def test_adm_file_moments_are_labelled_as_tf_inception(tmp_path, random_inception) -> None:
    from tread.eval.adm import ADM_MOMENTS

    images = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_tf.npz"
    np.savez(path, arr_0=images, mu=np.ones(2048), sigma=np.eye(2048))
    used = adm_reference_stats(path, random_inception, use_file_moments=True)
    np.testing.assert_array_equal(used.mu, np.ones(2048))
    assert used.features.shape == (3, 2048)  # KID/PR features still come from our net
    assert used.moments_net == ADM_MOMENTS and "precomputed" in used.moments_source
    only = adm_reference_stats(path)  # no net: the file's moments, labelled as such
    assert only.moments_net == ADM_MOMENTS and only.net == InceptionV3FID.name


def test_reference_file_kind_tells_stats_from_adm_and_refuses_the_rest(tmp_path) -> None:
    from tread.eval import reference_file_kind

    path, _ = _adm_batch(tmp_path)
    assert reference_file_kind(path) == "adm"
    stats = save_stats(FeatureStats(mu=np.zeros(2), sigma=np.eye(2)), tmp_path / "s.npz")
    assert reference_file_kind(stats) == "stats"
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros(3))
    with pytest.raises(DataError, match="neither a stats .npz .* nor an ADM batch.*images"):
        reference_file_kind(other)
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    for bad in (npy, text):
        with pytest.raises(DataError, match="not an .npz archive"):
            reference_file_kind(bad)
