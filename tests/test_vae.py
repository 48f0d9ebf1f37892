"""SD-VAE support: load offline, encode/decode, ``tread encode-latents``, decoding latent samples.

Everything runs on a tiny random ``AutoencoderKL`` (4 blocks, so 8x downsampling as in SD-VAE)
saved to a temporary folder: no weights are downloaded.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from tread.cli import main as cli_main
from tread.config import load_config
from tread.data import load_dataset, load_image_folder
from tread.data.vae import (
    decode_latents,
    encode_images,
    latent_decoder,
    load_vae,
    vae_downsampling,
)
from tread.errors import ConfigError
from tread.generate import latent_decoder_for
from tread.train import load_for_inference, train
from tread.train.evaluation import generate_images

from conftest import TINY_LATENT_MODEL

SCALE = 0.18215


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir, "cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """2 classes x 3 random RGB images; sizes differ so the centre crop is exercised."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i, size in enumerate([(32, 32), (40, 32), (32, 48)]):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def latents_npz(tmp_path_factory, vae_dir, image_dir):
    out = tmp_path_factory.mktemp("latents") / "latents.npz"
    args = ["encode-latents", str(image_dir), str(out), "--vae", str(vae_dir)]
    assert cli_main([*args, "--resolution", "32", "--batch-size", "4", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, latents_npz):
    run = tmp_path_factory.mktemp("train") / "run"
    overrides = [
        "data.name=latents",
        f"data.path={latents_npz}",
        f"data.latent_scale={SCALE}",
        *TINY_LATENT_MODEL,
        "train.log_every=1",
        "eval.every=0",
        "sample.grid_size=4",  # the final training grid: raw 4-channel latents
        "sample.steps=2",
        f"train.run_dir={run}",
    ]
    return train(load_config("digits_tread", overrides), progress=False)


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_deterministic_posterior_mean(vae):
    x = _images(3)
    z = encode_images(vae, x, batch_size=2)
    assert vae_downsampling(vae) == 8
    assert z.shape == (3, 4, 4, 4) and z.dtype == torch.float32
    assert torch.equal(z, encode_images(vae, x, batch_size=2))  # same input, same output
    torch.testing.assert_close(z, encode_images(vae, x, batch_size=3))  # batching: rounding only
    # Optional posterior sampling: reproducible for a seed, and not the mean.
    a = encode_images(vae, x, generator=torch.Generator().manual_seed(1))
    b = encode_images(vae, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, z)


def test_decode_divides_by_scale(vae):
    z = encode_images(vae, _images(2))
    images = decode_latents(vae, z * SCALE, SCALE, batch_size=1)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, decode_latents(vae, z, 1.0))


def test_encode_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="RGB"):
        encode_images(vae, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        encode_images(vae, torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match="4"):
        decode_latents(vae, torch.zeros(1, 3, 4, 4), SCALE)


def test_load_vae_errors(tmp_path, vae_dir, monkeypatch):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(ConfigError, match="no-such-vae"):
        load_vae(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_vae(tmp_path / "empty")
    # A whole pipeline folder: the VAE is read from its vae/ sub-folder.
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "vae").symlink_to(vae_dir, target_is_directory=True)
    assert load_vae(pipeline).config.latent_channels == 4
    # diffusers missing: a ConfigError naming the extra, not an ImportError.
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ConfigError, match=r"tread\[vae\]"):
        load_vae(vae_dir)


def test_encode_latents_round_trips_through_load_dataset(latents_npz, vae, image_dir):
    with np.load(latents_npz) as archive:
        assert set(archive.files) == {"latents", "labels"}
        assert archive["latents"].dtype == np.float16
    data = load_dataset("latents", path=latents_npz)
    assert data.latent and data.shape == (4, 4, 4) and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Unscaled posterior means of the centre-cropped images, stored as float16.
    images = load_image_folder(image_dir, resolution=32).images
    expected = encode_images(vae, images)
    torch.testing.assert_close(data.images, expected, rtol=2e-3, atol=2e-3)
    scaled = load_dataset("latents", path=latents_npz, scale_factor=SCALE)
    torch.testing.assert_close(scaled.images, data.images * SCALE)


def test_encode_latents_hflip_float32_from_npz(tmp_path, vae_dir, vae):
    rng = np.random.default_rng(1)
    src = tmp_path / "images.npz"
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(src, images=pixels, labels=[2, 0, 1, 2, 0])
    out = tmp_path / "sub" / "flip.npz"
    args = ["encode-latents", str(src), str(out), "--vae", str(vae_dir), "--resolution", "32"]
    assert cli_main([*args, "--hflip", "--dtype", "float32", "--batch-size", "2"]) == 0
    data = load_dataset("latents", path=out)
    assert data.images.shape == (10, 4, 4, 4) and data.num_classes == 3
    assert data.labels.tolist() == [2, 0, 1, 2, 0] * 2
    images = load_dataset("npz", path=src).images
    torch.testing.assert_close(data.images[:5], encode_images(vae, images))
    torch.testing.assert_close(data.images[5:], encode_images(vae, images.flip(-1)))


def test_encode_latents_refuses_to_overwrite(tmp_path, latents_npz, vae_dir, image_dir, capsys):
    before = latents_npz.read_bytes()
    args = ["encode-latents", str(image_dir), str(latents_npz), "--vae", str(vae_dir)]
    assert cli_main([*args, "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert latents_npz.read_bytes() == before
    # --overwrite replaces it, through a temporary file that does not stay behind.
    copy = tmp_path / "copy.npz"
    copy.write_bytes(b"old")
    args = ["encode-latents", str(image_dir), str(copy), "--vae", str(vae_dir)]
    assert cli_main([*args, "--resolution", "32", "--overwrite", "--workers", "0"]) == 0
    assert copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.npz"]


def test_encode_latents_needs_a_vae(tmp_path, image_dir, vae_dir, capsys, monkeypatch):
    monkeypatch.delenv("TREAD_VAE", raising=False)
    out = tmp_path / "z.npz"
    missing = tmp_path / "models" / "sd-vae-ft-ema"
    assert cli_main(["encode-latents", str(image_dir), str(out), "--vae", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    assert cli_main(["encode-latents", str(image_dir), str(out)]) == 2
    assert "--vae" in capsys.readouterr().err
    monkeypatch.setenv("TREAD_VAE", str(vae_dir))
    assert cli_main(["encode-latents", str(image_dir), str(out), "--resolution", "36"]) == 2
    assert "multiple" in capsys.readouterr().err
    assert cli_main(["encode-latents", str(image_dir), str(out), "--resolution", "16"]) == 0
    assert load_dataset("latents", path=out).shape == (4, 2, 2)
    assert not list(tmp_path.glob(".*"))


def test_training_grid_of_raw_latents_is_rgb(latent_run):
    grid = latent_run.run_dir / "samples" / "step_0000002.png"
    with Image.open(grid) as image:
        assert image.mode == "RGB"


def test_sample_decodes_latent_checkpoint(latent_run, vae_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TREAD_VAE", raising=False)
    run = str(latent_run.run_dir)
    base = ["sample", run, "--count", "4", "--steps", "2", "--batch-size", "3"]
    assert cli_main([*base, "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and len(err.strip().splitlines()) == 1
    vae = ["--vae", str(vae_dir)]
    assert cli_main([*base, *vae, "--out", str(tmp_path / "x.npz")]) == 0
    with np.load(tmp_path / "x.npz") as archive:
        assert archive["arr_0"].shape == (4, 32, 32, 3) and archive["arr_0"].dtype == np.uint8
    assert cli_main([*base, *vae, "--out", str(tmp_path / "folder")]) == 0
    files = sorted((tmp_path / "folder").iterdir())
    assert len(files) == 4
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    monkeypatch.setenv("TREAD_VAE", str(vae_dir))
    assert cli_main([*base, "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        assert image.mode == "RGB" and image.width >= 2 * 32


def test_generate_images_decodes_latents(latent_run, vae_dir):
    model, config, _ = load_for_inference(latent_run.run_dir)
    decode = latent_decoder_for(config, vae_dir)
    images, labels = generate_images(
        model, config, 3, seed=0, device=torch.device("cpu"), decode=decode, steps=2
    )
    assert images.shape == (3, 3, 32, 32) and images.abs().max() <= 1
    raw, _ = generate_images(model, config, 3, seed=0, device=torch.device("cpu"), steps=2)
    torch.testing.assert_close(images, decode(raw))
    digits = load_config("digits_tread", [])
    assert latent_decoder_for(digits, vae_dir) is None  # pixel models ignore --vae


def test_latent_decoder_takes_explicit_values(vae_dir):
    # Only the values it needs, not a run config: pixel models get no decoder, latent models
    # need a VAE whose latent width matches the model's, and decode with the given scale.
    assert latent_decoder(vae_dir, latent=False) is None
    with pytest.raises(ConfigError, match="--vae"):
        latent_decoder(None, latent=True, scale=SCALE)
    with pytest.raises(ConfigError, match="3"):
        latent_decoder(vae_dir, latent=True, scale=SCALE, channels=3)
    vae = load_vae(vae_dir)
    z = torch.randn(2, vae.config.latent_channels, 2, 2)
    decode = latent_decoder(vae_dir, latent=True, scale=SCALE, channels=z.shape[1])
    torch.testing.assert_close(decode(z), decode_latents(vae, z, SCALE))


class _MeanStdNet(torch.nn.Module):
    """A stand-in feature net for 3x32x32 images: per-channel mean and std (6 features)."""

    name = "mean_std"
    input_size = (3, 32, 32)

    def forward(self, images):
        pool = torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)  # (B, 6)
        return {"pool": pool, "logits": None, "spatial": None}


def test_eval_decodes_latent_checkpoint(latent_run, vae_dir, tmp_path, capsys, monkeypatch):
    import tread.train.evaluation as evaluation

    monkeypatch.delenv("TREAD_VAE", raising=False)
    monkeypatch.setattr(evaluation, "feature_net_for", lambda *a, **k: _MeanStdNet())
    # The input check would refuse "latents" as a feature net name before the VAE is looked at.
    monkeypatch.setattr(evaluation, "feature_net_name", lambda *a, **k: "digits")
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(6), sigma=np.eye(6))
    base = ["eval", str(latent_run.run_dir), "--num-samples", "4", "--steps", "2"]
    base += ["--metrics", "fd"]
    assert cli_main([*base, "--reference", str(stats)]) == 2
    assert "--vae" in capsys.readouterr().err
    assert cli_main([*base, "--vae", str(vae_dir)]) == 2  # default reference: the latents
    assert "--reference" in capsys.readouterr().err
    out = tmp_path / "e.json"
    args = [*base, "--vae", str(vae_dir), "--reference", str(stats), "--out", str(out)]
    assert cli_main(args) == 0
    record = json.loads(out.read_text())
    assert record["vae"] == str(vae_dir) and np.isfinite(record["metrics"]["fd"])
