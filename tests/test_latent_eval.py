"""In-loop evaluation of latent runs: the latent FD ("fd_latent"), the FID of VAE-decoded samples,
and the checks that refuse bad settings before training writes anything.

The FID path runs a tiny random diffusers ``AutoencoderKL`` (as in test_vae.py) and a stand-in for
the Inception network (no weights are available offline): the test checks the wiring, i.e. that
the net sees exactly the quantised decoded samples, not Inception's numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from tread.cli import main as cli_main
from tread.config import load_config
from tread.data import load_latents
from tread.data.arrays import ImageArrays
from tread.errors import ConfigError, DataError
from tread.eval import FeatureStats, load_stats, quantize_uint8, save_stats
from tread.eval.latent import (
    check_latent_reference,
    fd_latent,
    latent_feature_name,
    latent_features,
    latent_reference_stats,
    latent_stats,
)
from tread.train import load_for_inference, train
from tread.train.evaluation import default_eval_hook, generate_images
from tread.train.rundir import ALLOWED_CHANGES

# A latent run on 4x4x4 latents: 16 tokens at patch 1, two blocks, 4 steps, evaluated at 2 and 4.
LATENT_RUN = [
    "data.name=latents",
    "data.latent_scale=0.5",  # the model's latents are half the stored ones
    "model.depth=2",
    "model.width=32",
    "model.heads=2",
    "model.patch_size=1",
    "model.routes=[{start: 0, end: 0, ratio: 0.5}]",
    "train.steps=4",
    "train.batch_size=8",
    "train.sample_every=0",
    "train.max_minutes=null",
    "train.log_every=1",
    "train.device=cpu",
    "eval.every=2",
    "eval.num_samples=8",
    "eval.reference_split=train",
    "sample.grid_size=2",
    "sample.steps=2",
]


def error_line_of(capsys, command: str) -> str:
    """The single stderr line of a refused command (as test_cli.py checks it)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"tread {command}: error: "), err
    return err[len(f"tread {command}: error: ") :]


def _structured_latents(n: int, shape=(4, 4, 4), seed: int = 0) -> np.ndarray:
    """Latents with a per-channel offset and spatial pattern (far from white noise)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    offset = np.linspace(-1.0, 1.0, c)[:, None, None] + np.linspace(0, 0.5, h * w).reshape(h, w)
    return (0.3 * rng.standard_normal((n, c, h, w)) + offset).astype(np.float32)


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    np.save(folder / "latents.npy", _structured_latents(64))
    np.save(folder / "labels.npy", np.arange(64) % 2)
    return folder / "latents.npy"


def _config(latent_file, run_dir, *extra):
    return load_config(
        "digits_tread",
        [*LATENT_RUN, f"data.path={latent_file}", f"train.run_dir={run_dir}", *extra],
    )


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, latent_file):
    config = _config(latent_file, tmp_path_factory.mktemp("train") / "run")
    return train(config, eval_hook=default_eval_hook(config), progress=False)


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """A fake Inception weights file (the net is stubbed) and an ADM batch of 32x32 images."""
    folder = tmp_path_factory.mktemp("fid")
    weights = folder / "pt_inception.pth"
    weights.write_bytes(b"stand-in")
    rng = np.random.default_rng(1)
    adm = folder / "ref_batch.npz"
    np.savez(adm, arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    return weights, adm


# --- (b) the metric ---------------------------------------------------------------------------


def test_latent_features_are_block_means_on_a_grid_of_at_most_8():
    z = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = latent_features(z)
    assert feats.shape == (3, 4 * 8 * 8)  # SD-VAE latents: 256 features
    block = z[:, :, :4, 4:8].mean((2, 3))  # cell (0, 1) of the 8x8 grid, every channel
    torch.testing.assert_close(feats.view(3, 4, 8, 8)[:, :, 0, 1], block)
    small = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(latent_features(small), small.flatten(1))  # no upsampling
    assert latent_feature_name((4, 32, 32)) == "latent_avgpool8x8"
    assert latent_feature_name((4, 4, 4)) == "latent_avgpool4x4"


def test_fd_latent_drops_when_the_samples_are_the_reference():
    data = ImageArrays(
        images=torch.from_numpy(_structured_latents(512, seed=0)),
        labels=torch.zeros(512, dtype=torch.int64),
        num_classes=1,
        name="latents",
        latent=True,
    )
    reference = latent_reference_stats(data, generator=torch.Generator().manual_seed(0))
    assert reference.num_samples == 512 and reference.net == "latent_avgpool4x4"
    same = fd_latent(data.images, reference)
    fresh = fd_latent(torch.from_numpy(_structured_latents(512, seed=1)), reference)
    noise = fd_latent(
        torch.randn(512, 4, 4, 4, generator=torch.Generator().manual_seed(2)), reference
    )
    assert same < 1e-6  # identical moments
    assert fresh < 0.2 * noise and noise > 10  # same distribution: near; noise: far
    with pytest.raises(DataError, match="latent_avgpool8x8"):  # other features are refused
        fd_latent(torch.randn(4, 4, 8, 8), reference)


def test_reference_is_a_seeded_subset_read_in_bounded_batches(latent_file):
    lazy = load_latents(latent_file, mmap=True, scale_factor=0.5)
    reads = []
    take = lazy.take

    def spy(indices):
        reads.append(indices.clone())
        return take(indices)

    lazy.take = spy  # the memory-mapped file is read through take only, 16 rows at a time
    stats = latent_reference_stats(
        lazy, generator=torch.Generator().manual_seed(3), count=40, batch_size=16
    )
    assert [len(r) for r in reads] == [16, 16, 8] and stats.num_samples == 40
    picked = torch.cat(reads)
    assert bool((picked.diff() > 0).all())  # ascending: the file is read front to back
    # The same draw from the in-memory copy gives the same statistics (scale applied once).
    eager = load_latents(latent_file, scale_factor=0.5)
    again = latent_reference_stats(eager, generator=torch.Generator().manual_seed(3), count=40)
    np.testing.assert_allclose(again.mu, stats.mu, rtol=1e-6)
    direct = latent_stats([eager.images[picked]], source="x")
    np.testing.assert_allclose(direct.sigma, stats.sigma, rtol=1e-5, atol=1e-8)


# --- (a) the training run ---------------------------------------------------------------------


def test_latent_run_logs_fd_latent_and_caches_its_reference(latent_run):
    rows = [json.loads(x) for x in (latent_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        assert set(k for k in row if k.startswith("eval/")) == {"eval/fd_latent"}  # no acc
        assert np.isfinite(row["eval/fd_latent"]) and row["eval/fd_latent"] >= 0
    cache = load_stats(latent_run.run_dir / "eval" / "ref_latents_train_latent.npz")
    assert cache.net == "latent_avgpool4x4" and cache.num_samples == 64  # all 64 (< the cap)
    # The reference is in the model's space: the stored latents times data.latent_scale.
    stored = torch.from_numpy(np.load(latent_run.config.data.path))
    np.testing.assert_allclose(cache.mu, latent_features(0.5 * stored).mean(0).numpy(), rtol=1e-5)


def test_latent_reference_may_be_a_stats_file(latent_run, tmp_path):
    model, config, _ = load_for_inference(latent_run.run_dir)
    cache = latent_run.run_dir / "eval" / "ref_latents_train_latent.npz"
    scores = {}
    for where, reference in (("split", "train"), ("file", str(cache))):
        run = dataclasses.replace(config.train, run_dir=str(tmp_path / where))
        evals = dataclasses.replace(config.eval, reference_split=reference)
        small = dataclasses.replace(config, train=run, eval=evals)
        scores[where] = default_eval_hook(small)(4, model, small)["fd_latent"]
    assert scores["split"] == pytest.approx(scores["file"], rel=1e-9)
    assert not (tmp_path / "file").exists()  # a stats reference is not cached again


# --- (c) FID of decoded samples ---------------------------------------------------------------


class _RecordingNet(torch.nn.Module):
    """Stands in for the FID Inception: per-channel mean and std (6 features); keeps its inputs."""

    name = "inception_v3_fid"
    input_size = (3, 299, 299)

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.clone())
        pool = torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)  # (B, 6)
        return {"pool": pool, "logits": None, "spatial": None}


def test_fid_path_scores_the_decoded_samples(latent_run, vae_dir, fid_files, tmp_path, monkeypatch):
    import tread.eval
    from tread.generate import latent_decoder_for

    weights, adm = fid_files
    net = _RecordingNet()
    monkeypatch.setattr(tread.eval, "load_inception", lambda *a, **k: net)
    model, config, _ = load_for_inference(latent_run.run_dir)
    evals = dataclasses.replace(
        config.eval, feature_net="inception", reference_split=str(adm), vae=str(vae_dir)
    )
    run = dataclasses.replace(config.train, run_dir=str(tmp_path / "run"))
    fid_config = dataclasses.replace(config, eval=evals, train=run)
    scores = default_eval_hook(fid_config, inception_weights=weights)(4, model, fid_config)
    assert set(scores) == {"fid"} and np.isfinite(scores["fid"])  # FID, no acc
    # The net saw the reference images, then the generated latents decoded (divided by
    # data.latent_scale) to 32x32 RGB and quantised to uint8 levels.
    assert [tuple(x.shape) for x in net.seen] == [(12, 3, 32, 32), (8, 3, 32, 32)]
    raw, _ = generate_images(model, config, 8, seed=config.sample.seed, device=torch.device("cpu"))
    decoded = latent_decoder_for(config, vae_dir)(raw)
    torch.testing.assert_close(net.seen[1], quantize_uint8(decoded))


# --- (d) bad settings fail when the hook is created -------------------------------------------


INCEPTION = {"feature_net": "inception", "reference_split": "ADM"}
BAD_SETTINGS = [
    # (eval.* values, error type, message part); "w": None = no Inception weights
    ({"reference_split": "test"}, ConfigError, "no test split"),
    ({"vae": "VAE"}, ConfigError, "only read for the FID"),
    ({"feature_net": "digits"}, ConfigError, "cannot score a latent run"),
    ({"reference_split": "ADM"}, ConfigError, "ADM batch holds images"),
    ({"feature_net": "inception", "vae": "VAE"}, ConfigError, "reference_split=train"),
    (INCEPTION, ConfigError, "set eval.vae"),
    ({**INCEPTION, "vae": "MISSING"}, ConfigError, "eval.vae: VAE folder not found"),
    ({**INCEPTION, "vae": "EMPTY"}, ConfigError, "config.json"),
    ({**INCEPTION, "vae": "VAE", "w": None}, DataError, "Inception weights not given"),
]


def _settings(values, vae_dir, adm, tmp_path):
    names = {"VAE": str(vae_dir), "ADM": str(adm), "MISSING": str(tmp_path / "nope")}
    (tmp_path / "empty").mkdir(exist_ok=True)
    names["EMPTY"] = str(tmp_path / "empty")
    return {k: names.get(v, v) for k, v in values.items() if k != "w"}


@pytest.mark.parametrize(("values", "error", "message"), BAD_SETTINGS)
def test_bad_settings_fail_at_hook_creation(
    latent_file, vae_dir, fid_files, tmp_path, values, error, message
):
    weights, adm = fid_files
    config = _config(latent_file, tmp_path / "run")
    evals = dataclasses.replace(config.eval, **_settings(values, vae_dir, adm, tmp_path))
    bad = dataclasses.replace(config, eval=evals)
    with pytest.raises(error, match=message) as caught:
        default_eval_hook(bad, inception_weights=None if "w" in values else weights)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_pixel_run_refuses_eval_vae_and_latent_reference_refuses_image_stats(tmp_path, vae_dir):
    pixels = load_config("digits_tread", ["eval.every=2", f"eval.vae={vae_dir}"])
    with pytest.raises(ConfigError, match="a pixel run decodes nothing"):
        default_eval_hook(pixels)
    stats = tmp_path / "images.npz"
    save_stats(FeatureStats(mu=np.zeros(6), sigma=np.eye(6), net="digits_classifier"), stats)
    with pytest.raises(ConfigError, match="digits_classifier statistics, not latent"):
        check_latent_reference(str(stats))
    assert "eval.vae" in ALLOWED_CHANGES  # a moved VAE folder does not block a resume
    with pytest.raises(ConfigError, match="eval.vae must not be empty"):
        load_config("digits_tread", ["eval.vae=' '"])


def test_vae_checks_find_a_missing_diffusers_and_other_channels(
    latent_file, vae_dir, fid_files, tmp_path, monkeypatch
):
    import tread.eval.latent as latent

    weights, adm = fid_files
    config = _config(
        latent_file,
        tmp_path / "run",
        "eval.feature_net=inception",
        f"eval.reference_split={adm}",
        f"eval.vae={vae_dir}",
    )
    default_eval_hook(config, inception_weights=weights)  # fine as it is
    wide = dataclasses.replace(config, model=dataclasses.replace(config.model, in_channels=3))
    with pytest.raises(ConfigError, match="4 latent channels but the model generates 3"):
        default_eval_hook(wide, inception_weights=weights)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        latent.importlib.util, "find_spec", lambda n, *a: None if n == "diffusers" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="needs diffusers"):
        default_eval_hook(config, inception_weights=weights)


# --- (d) ... and through `tread train --dry-run` ------------------------------------------------


def _dry_run(latent_file, tmp_path, *overrides):
    args = [*LATENT_RUN, f"data.path={latent_file}", f"train.run_dir={tmp_path / 'run'}"]
    return cli_main(["train", "digits_tread", "--dry-run", *args, *overrides])


def test_dry_run_checks_latent_eval_settings(
    latent_file, vae_dir, fid_files, tmp_path, capsys, monkeypatch
):
    weights, adm = fid_files
    monkeypatch.delenv("TREAD_VAE", raising=False)
    monkeypatch.delenv("TREAD_INCEPTION_WEIGHTS", raising=False)
    assert _dry_run(latent_file, tmp_path) == 0  # the latent FD needs nothing more
    assert "reference_split: train" in capsys.readouterr().out
    fid = ["eval.feature_net=inception", f"eval.reference_split={adm}"]
    assert _dry_run(latent_file, tmp_path, *fid) == 2
    assert "Inception weights not given" in error_line_of(capsys, "train")
    monkeypatch.setenv("TREAD_INCEPTION_WEIGHTS", str(weights))
    assert _dry_run(latent_file, tmp_path, *fid) == 2
    assert "set eval.vae (or $TREAD_VAE)" in error_line_of(capsys, "train")
    monkeypatch.setenv("TREAD_VAE", str(tmp_path / "nope"))
    assert _dry_run(latent_file, tmp_path, *fid) == 2
    assert error_line_of(capsys, "train").startswith("$TREAD_VAE: VAE folder not found")
    monkeypatch.setenv("TREAD_VAE", str(vae_dir))
    assert _dry_run(latent_file, tmp_path, *fid) == 0
    capsys.readouterr()
    # A VAE of 3 latent channels: only the data tells the model's channels (4), after resolving.
    other = tmp_path / "vae3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"latent_channels": 3}))
    assert _dry_run(latent_file, tmp_path, *fid, f"eval.vae={other}") == 2
    assert "3 latent channels but the model generates 4" in error_line_of(capsys, "train")
    assert _dry_run(latent_file, tmp_path, "eval.reference_split=test") == 2
    assert "no test split" in error_line_of(capsys, "train")
    assert not (tmp_path / "run").exists()
