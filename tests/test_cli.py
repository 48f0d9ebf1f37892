"""CLI-level checks: every user error is one line on stderr with exit code 2, and nothing is
written before all checks pass (``tread train --dry-run``, ``tread sample``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tread.generate
from tread.cli import main
from tread.config import PRESET_DIR, load_config
from tread.data.idx import IDX_SEARCH_DIRS
from tread.train import train

from conftest import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "train.batch_size=16",
    "train.sample_every=0",
    "train.max_minutes=null",
    "eval.every=0",
]

HEADER = (
    "# DiT-S/2 registry entry with depth 8, width 128, 4 heads; "
    "tokens: 64 (8x8, patch 1); routes: r(2→4, 0.5)"
)


def error_line(capsys, command: str) -> str:
    """The single stderr line of a refused command, without its ``tread CMD: error:`` prefix."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    prefix = f"tread {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) :]


# --- tread train --dry-run --------------------------------------------------------------------


def test_dry_run_override_after_flag_prints_resolved_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--dry-run", "train.steps=5", f"train.run_dir={run_dir}"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(HEADER + "\n")
    for line in ("  steps: 5", "  depth: 8", "  width: 128", "  heads: 4", "  patch_size: 1"):
        assert f"\n{line}\n" in out, line
    for line in ("  input_size: 8", "  in_channels: 1", "  num_classes: 10", "  mlp_ratio: 4.0"):
        assert f"\n{line}\n" in out, line
    assert "time_sampling" not in out and "logit_std" not in out  # EDM: no flow-only keys
    assert not run_dir.exists()  # --dry-run writes nothing


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.name=flow", "sample.sampler='edm_heun' integrates an 'edm' model"),
        ("model.routes.0.end=12", "model.routes.0.end=12 is out of range"),
        ("model.routes.1.start=3", "model.routes.1 (blocks 3..4) overlaps"),
        ("model.num_classes=5", "model.num_classes=5 but data digits has labels up to 9"),
        ("model.mlp_ratio=-1", "model.mlp_ratio=-1.0 must be > 0"),
        ("train.num_threads=-1", "train.num_threads=-1 must be >= 1"),
        ("optim.eps=-1", "optim.eps=-1.0 must be > 0"),
        ("eval.num_samples=0", "eval.num_samples=0 must be > 0"),
        ("eval.every=-5", "eval.every=-5 must be >= 0"),
        ("eval.reference_split=val", "eval.reference_split='val'"),
    ],
)
def test_dry_run_refuses_bad_config_in_one_line(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--dry-run", override, f"train.run_dir={run_dir}"]) == 2
    assert message in error_line(capsys, "train")
    assert not run_dir.exists()


def test_dry_run_refuses_a_run_dir_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--dry-run", f"train.run_dir={blocker / 'run'}"]) == 2
    assert f"{blocker} is a file, not a directory" in error_line(capsys, "train")


def test_train_refuses_num_classes_before_writing(tmp_path, capsys):
    # Without --dry-run too: the check runs before the run directory is created.
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "train.steps=1", "model.num_classes=5", f"train.run_dir={run_dir}"]
    assert main(args) == 2
    assert "model.num_classes=5" in error_line(capsys, "train")
    assert not run_dir.exists()


def test_dry_run_refuses_absurd_npz_label(tmp_path, capsys):
    path = tmp_path / "huge_label.npz"
    labels = np.array([0, 1_000_000_000])
    np.savez(path, images=np.zeros((2, 8, 8, 1), np.uint8), labels=labels)
    args = ["train", "--dry-run", "data.name=npz", f"data.path={path}", "model.patch_size=2"]
    args.append("eval.every=0")  # no packaged feature net for npz data
    assert main(args) == 2
    message = error_line(capsys, "train")
    assert str(path) in message and "1000000000" in message


def _preset_data_available(name: str) -> bool:
    config = load_config(name)
    if config.data.name == "fashion_mnist" and config.data.path is None:
        return Path(IDX_SEARCH_DIRS["fashion_mnist"][0]).is_dir()
    return config.data.path is None or Path(config.data.path).exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_passes_dry_run(name, tmp_path, capsys):
    if not _preset_data_available(name):
        pytest.skip(f"data of preset {name} is not on this machine")
    run_dir = tmp_path / "run"
    assert main(["train", name, "--dry-run", f"train.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "tokens: " in out.splitlines()[0] and "depth: null" not in out
    assert not run_dir.exists()


# --- tread sample -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-step run of a tiny 10-class digits model (a checkpoint to sample from)."""
    root = tmp_path_factory.mktemp("cli_run")
    config = load_config("digits_tread", [*TINY, "train.steps=1", f"train.run_dir={root / 'run'}"])
    return train(config, progress=False).run_dir


def sample_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", str(run_dir), "--count", "4", "--steps", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("name", ["x.jpg", "x.PNG.tmp", "x.safetensors"])
def test_sample_refuses_unknown_suffix_before_loading(tmp_path, capsys, name):
    # The checkpoint does not exist: the --out check must come first.
    out = tmp_path / name
    assert main(sample_args(tmp_path / "no_such_run", out)) == 2
    message = error_line(capsys, "sample")
    assert str(out) in message and "unknown suffix" in message
    assert not out.exists()


def test_sample_refuses_to_overwrite_without_flag(run_dir, tmp_path, capsys):
    for name in ("old.npz", "old.png"):
        out = tmp_path / name
        out.write_bytes(b"keep me")
        assert main(sample_args(run_dir, out)) == 2
        assert "--overwrite" in error_line(capsys, "sample")
        assert out.read_bytes() == b"keep me"
        assert main(sample_args(run_dir, out, "--overwrite")) == 0
        capsys.readouterr()  # the progress bar
        assert out.read_bytes() != b"keep me"


def test_sample_directory_output(run_dir, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "other.txt").write_text("x")
    assert main(sample_args(run_dir, full)) == 2
    assert "not empty" in error_line(capsys, "sample")
    assert sorted(p.name for p in full.iterdir()) == ["other.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(sample_args(run_dir, empty)) == 0  # an existing empty directory is fine
    assert len(list(empty.glob("*.png"))) == 4


def test_sample_refuses_unwritable_places(run_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(sample_args(run_dir, blocker / "grid.png")) == 2
    assert f"{blocker} is a file" in error_line(capsys, "sample")
    # A missing folder followed by ".." must not hide the file behind it.
    assert main(sample_args(run_dir, tmp_path / "missing" / ".." / "file" / "grid.png")) == 2
    assert f"{blocker} is a file" in error_line(capsys, "sample")
    # A read-only directory (simulated: the tests may run as root, who may write anywhere).
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        tread.generate.os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode)
    )
    assert main(sample_args(run_dir, readonly / "x.npz")) == 2
    assert f"{readonly} is not writable" in error_line(capsys, "sample")
    assert main(sample_args(run_dir, readonly / "sub")) == 2
    assert "not writable" in error_line(capsys, "sample")
    assert not list(readonly.iterdir())


def test_sample_labels_checked_against_the_model(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(sample_args(run_dir, out, "--labels", "10")) == 2
    assert "--labels: 10 is not a class of this model (0..9)" in error_line(capsys, "sample")
    assert main(sample_args(run_dir, out, "--labels", "3,x")) == 2
    assert "uncond" in error_line(capsys, "sample")
    assert not out.exists()
    # An explicit "uncond" gives the null label (10), i.e. unconditional samples.
    assert main(sample_args(run_dir, out, "--labels", "uncond,2")) == 0
    with np.load(out) as archive:
        assert archive["labels"].tolist() == [10, 2, 10, 2]


def test_sample_grid_has_one_column_per_class(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "--count", "20", "--steps", "1", "--out", str(out)]) == 0
    scale, side, pad = 96 // 8, 8, 2  # 8x8 digits are enlarged 12x; 2 px gaps
    with Image.open(out) as image:
        assert image.size == (scale * (10 * (side + pad) + pad), scale * (2 * (side + pad) + pad))


@pytest.mark.parametrize(
    "flag, value", [("--count", "0"), ("--count", "-3"), ("--batch-size", "0"), ("--steps", "0")]
)
def test_sample_refuses_non_positive_counts(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "integer >= 1" in err


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_sample_refuses_unavailable_device(run_dir, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "x.png"
    assert main(sample_args(run_dir, out, "--device", device)) == 2
    message = error_line(capsys, "sample")
    assert message.startswith(f"--device {device!r}" if device == "tpu" else "--device cuda: no")
    assert not out.exists()


def test_sample_prints_guidance_nfe_and_flops(run_dir, tmp_path, capsys):
    from tread.cost import forward_flops
    from tread.routing import Route
    from tread.train import load_for_inference

    model, _, _ = load_for_inference(run_dir)
    dense, routed = forward_flops(model), forward_flops(model, [Route(1, 1, 0.5)])
    evaluations = 2 * 2 - 1  # edm_heun with 2 steps
    expected = {
        (): f"guidance cfg 1 | NFE/image {evaluations}, GFLOPs/image "
        f"{evaluations * dense / 1e9:.4g}",
        ("--guidance", "2"): f"guidance cfg 2 | NFE/image {2 * evaluations}, GFLOPs/image "
        f"{2 * evaluations * dense / 1e9:.4g}",
        ("--guidance", "2", "--guidance-mode", "sg"): "guidance sg 2 (0→0.5 on 1..1) | "
        f"NFE/image {2 * evaluations}, GFLOPs/image {evaluations * (dense + routed) / 1e9:.4g}",
    }
    for flags, ending in expected.items():
        assert main(sample_args(run_dir, tmp_path / "s.npz", "--overwrite", *flags)) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("wrote 4 samples from step 1") and line.endswith(ending), line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance-mode", "sgx"], "--guidance-mode 'sgx': 'sgx' is not one of cfg, sg, cfg+sg"),
        (["--guidance", "1,2"], "--guidance takes one value here; sweeps are for tread eval"),
        (["--guidance", "x"], "--guidance 'x': expected comma-separated numbers"),
        (["--guidance", "-1"], "sample.guidance=-1.0 must be >= 0"),
        (["--guidance-mode", "sg", "--sg-strong", "0.5"], "below the weak ratio 0.5"),
        (["--guidance-mode", "sg", "--sg-weak", "1"], "sample.sg_weak_ratio=1.0 (--sg-weak)"),
        (["--guidance-mode", "sg", "--sg-weak", "0.2,0.3"], "--sg-weak '0.2,0.3': expected one"),
        (["--guidance-mode", "sg", "--sg-route", "0,3"], "outside the model's 3 blocks"),
        (["--guidance-mode", "sg", "--sg-route", "1"], "--sg-route '1': expected START,END"),
        (["--sg-weak", "0.7"], "--sg-weak applies to --guidance-mode sg or cfg+sg"),
        (["--guidance-interval", "1,2,3"], "--guidance-interval '1,2,3': expected LO,HI"),
        (["--guidance-interval", "3,1"], "sample.guidance_interval=[3.0, 1.0]"),
    ],
)
def test_sample_refuses_bad_guidance_before_sampling(run_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "s.npz"
    assert main(sample_args(run_dir, out, *flags)) == 2
    assert message in error_line(capsys, "sample")
    assert not out.exists()
