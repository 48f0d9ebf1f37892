"""Latent shard directories: streamed reading (bounded memory, same batches as in memory,
resumable), validation, and ``tread encode-latents`` writing them (shards, resume, refusals)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tread.cli import main as cli_main
from tread.config import load_config
from tread.data import BatchStream, ImageArrays, ShardedArray, load_dataset
from tread.data import arrays as arrays_module
from tread.errors import ConfigError, DataError

from conftest import TINY_LATENT_MODEL

SCALE = 0.18215


def write_shards(root: Path, latents: np.ndarray, labels: np.ndarray, sizes: list[int]) -> Path:
    """Lay ``latents`` (N, C, H, W) out as a shard directory by hand, ``sizes`` rows per shard."""
    root.mkdir(parents=True, exist_ok=True)
    entries, start = [], 0
    for k, size in enumerate(sizes):
        names = {"latents": f"latents_{k:05d}.npy", "labels": f"labels_{k:05d}.npy"}
        np.save(root / names["latents"], latents[start : start + size])
        np.save(root / names["labels"], labels[start : start + size])
        entries.append({**names, "count": size})
        start += size
    manifest = {
        "format": "tread-latent-shards",
        "version": 1,
        "num_samples": start,
        "shape": list(latents.shape[1:]),
        "dtype": str(latents.dtype),
        "num_classes": None,
        "scale_factor": None,
        "shards": entries,
    }
    (root / "index.json").write_text(json.dumps(manifest))
    return root


def random_latents(n: int = 37, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latents = (rng.standard_normal((n, 4, 3, 3)) * 3).astype(np.float16)
    return latents, (np.arange(n) % 5).astype(np.int64)


def in_memory(latents: np.ndarray, labels: np.ndarray, scale: float) -> ImageArrays:
    """The same data as one float32 tensor, scaled as the lazy path scales each batch."""
    images = torch.from_numpy(latents).to(torch.float32).mul_(scale)
    return ImageArrays(images, torch.from_numpy(labels), 5, "latents", latent=True)


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shard_batches_equal_in_memory_and_resume(tmp_path, world_size, drop_last):
    latents, labels = random_latents()
    root = write_shards(tmp_path / "z", latents, labels, [10, 10, 10, 7])
    lazy = load_dataset("latents", path=root, scale_factor=SCALE)
    assert isinstance(lazy.images, ShardedArray) and len(lazy) == 37 and lazy.shape == (4, 3, 3)
    assert lazy.num_classes == 5
    eager = in_memory(latents, labels, SCALE)

    def streams(data):
        return [
            BatchStream(
                data, 4, seed=3, rank=r, world_size=world_size, hflip=True, drop_last=drop_last
            )
            for r in range(world_size)
        ]

    lazy_streams, eager_streams = streams(lazy), streams(eager)
    for step in range(25):  # several epochs, so epoch ends and partial batches are crossed
        for a, b in zip(lazy_streams, eager_streams, strict=True):
            (xa, ya), (xb, yb) = next(a), next(b)
            assert xa.dtype == torch.float32 and ya.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb), step
    # Resume every rank from its state: the continuation is the same batches.
    resumed = streams(load_dataset("latents", path=root, scale_factor=SCALE))
    for stream, source in zip(resumed, lazy_streams, strict=True):
        stream.load_state_dict(source.state_dict())
    for _ in range(10):
        for a, b in zip(resumed, eager_streams, strict=True):
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_take_keeps_order_and_reads_lazily(tmp_path, monkeypatch):
    latents, labels = random_latents()
    latents[33, 1, 2, 0] = np.nan  # only a read of row 33 may notice
    root = write_shards(tmp_path / "z", latents, labels, [10, 10, 10, 7])
    reads = []
    real_read = ShardedArray.read
    monkeypatch.setattr(
        ShardedArray, "read", lambda self, *a: reads.append(a) or real_read(self, *a)
    )
    data = load_dataset("latents", path=root)  # manifest + labels only
    assert reads == []
    idx = torch.tensor([36, 0, 12, 12, 9, 10, 29, 5])  # across shards, repeats, any order
    images, y = data.take(idx)
    assert torch.equal(images, torch.from_numpy(latents[idx.numpy()]).float())
    assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
    with pytest.raises(DataError, match=r"latents_00003\.npy row 3 holds NaN"):
        data.take(torch.tensor([1, 33]))


def test_reads_without_madvise_and_after_pickling(tmp_path, monkeypatch):
    latents, labels = random_latents()
    root = write_shards(tmp_path / "z", latents, labels, [30, 7])
    data = load_dataset("latents", path=root)
    copy = pickle.loads(pickle.dumps(data))  # spawned workers get a copy without open maps
    idx = torch.tensor([31, 2, 29])
    expected = torch.from_numpy(latents[idx.numpy()]).float()
    assert torch.equal(copy.take(idx)[0], expected)
    monkeypatch.setattr(arrays_module, "_CAN_DROP_PAGES", False)  # e.g. Windows: close the maps
    assert torch.equal(data.take(idx)[0], expected) and data.images._maps == {}


def test_prefetcher_reads_shards_ahead_identically(tmp_path):
    from tread.data.loader import Prefetcher

    latents, labels = random_latents()
    root = write_shards(tmp_path / "z", latents, labels, [10, 10, 10, 7])
    ahead = Prefetcher(
        BatchStream(load_dataset("latents", path=root), 4, seed=1), torch.device("cpu")
    )
    plain = BatchStream(in_memory(latents, labels, 1.0), 4, seed=1)
    try:
        for _ in range(12):
            (xa, ya), (xb, yb) = next(ahead), next(plain)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert ahead.state_dict() == plain.state_dict()  # batches returned, not read ahead
    finally:
        ahead.close()


def _manifest_edit(key, value):
    def edit(root: Path) -> None:
        manifest = json.loads((root / "index.json").read_text())
        manifest[key] = value
        (root / "index.json").write_text(json.dumps(manifest))

    return edit


def _replace_file(name, array):
    def edit(root: Path) -> None:
        np.save(root / name, array)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: (r / "index.json").unlink(), r"neither index\.json .* nor latents\.npy"),
        (lambda r: (r / "index.json").write_text("{not json"), r"index\.json as JSON"),
        (_manifest_edit("format", "other"), r"index\.json: format='other'"),
        (_manifest_edit("version", 2), r"index\.json: version=2.*newer"),
        (_manifest_edit("dtype", "int8"), r"index\.json: dtype='int8'"),
        (_manifest_edit("num_samples", 36), r"index\.json: num_samples=36"),
        (
            _manifest_edit("shards", [{"latents": "../x.npy", "labels": "l.npy", "count": 1}]),
            r"index\.json: shards\[0\]",
        ),
        (lambda r: (r / "latents_00001.npy").unlink(), r"shard file missing: .*latents_00001"),
        (lambda r: (r / "labels_00000.npy").unlink(), r"shard file missing: .*labels_00000"),
        (
            _replace_file("latents_00001.npy", np.zeros((9, 4, 3, 3), np.float16)),
            r"latents_00001\.npy holds 9 rows, index\.json says 10",
        ),
        (
            _replace_file("latents_00001.npy", np.zeros((10, 4, 3, 2), np.float16)),
            r"latents_00001\.npy holds float16 \(4, 3, 2\)",
        ),
        (
            _replace_file("latents_00000.npy", np.zeros((10, 4, 3, 3), np.float32)),
            r"latents_00001\.npy holds float16 .* but .*latents_00000\.npy holds float32",
        ),
        (
            _replace_file("latents_00000.npy", np.zeros((10, 4, 3, 3), np.int16)),
            r"latents_00000\.npy latents must be float16/float32",
        ),
        (lambda r: (r / "latents_00001.npy").write_bytes(b"junk"), r"cannot read .*latents_00001"),
        (
            _replace_file("labels_00001.npy", np.zeros(10, np.float32)),
            r"labels_00001\.npy labels must be 1-D integers",
        ),
        (_replace_file("labels_00001.npy", np.full(10, -1)), r"labels_00001\.npy has negative"),
        (
            _replace_file("labels_00001.npy", np.zeros(8, np.int64)),
            r"labels_00001\.npy has 8 labels, the index says 10",
        ),
    ],
)
def test_bad_shard_directories_fail_in_one_line(tmp_path, edit, message):
    latents, labels = random_latents()
    root = write_shards(tmp_path / "z", latents, labels, [10, 10, 10, 7])
    edit(root)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("latents", path=root)
    assert "\n" not in str(err.value)


def test_truncated_shard_and_declared_classes(tmp_path):
    latents, labels = random_latents()
    root = write_shards(tmp_path / "z", latents, labels, [30, 7])
    with pytest.raises(DataError, match=r"labels_00000\.npy has label 4 but num_classes is 3"):
        load_dataset("latents", path=root, num_classes=3)
    manifest = json.loads((root / "index.json").read_text())
    manifest["num_classes"] = 1000  # ImageNet subsets keep the 1000-class ids
    (root / "index.json").write_text(json.dumps(manifest))
    assert load_dataset("latents", path=root).num_classes == 1000
    data = (root / "latents_00001.npy").read_bytes()
    (root / "latents_00001.npy").write_bytes(data[:-100])  # a copy cut short
    with pytest.raises(DataError, match=r"latents_00001\.npy"):
        load_dataset("latents", path=root)


# Runs in a fresh process so the resident set measures this dataset alone. After the imports,
# clear_refs resets VmHWM (the peak resident set); loading and one epoch must then stay within
# the budget. VmRSS is also sampled after every batch in case the reset is refused.
_STREAM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tread.data import BatchStream, load_dataset
    from tread.data import arrays

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    if sys.argv[2] == "keep-pages":  # the control: a plain memmap's behaviour
        arrays.ShardedArray._release = lambda self, k: None
    open("/proc/self/clear_refs", "w").write("5")
    start = peak = status("VmRSS")
    data = load_dataset("latents", path=sys.argv[1], scale_factor=0.18215)
    stream = BatchStream(data, 256, seed=0, drop_last=False)
    for _ in range(-(-len(data) // 256)):  # one epoch: every row is read once
        images, labels = next(stream)
        peak = max(peak, status("VmRSS"))
    print(json.dumps({"growth": max(status("VmHWM"), peak) - start, "n": len(data)}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_an_epoch_streams_in_bounded_memory(tmp_path):
    # 4 shards x 6000 x (4, 32, 32) float16 = 196 MB on disk, against a 64 MB budget.
    root = tmp_path / "big"
    root.mkdir()
    entries = []
    for k in range(4):
        name = f"latents_{k:05d}.npy"
        rows = np.lib.format.open_memmap(root / name, "w+", np.float16, (6000, 4, 32, 32))
        rows[:] = np.arange(6000, dtype=np.float16)[:, None, None, None] / 6000
        rows.flush()
        del rows
        np.save(root / f"labels_{k:05d}.npy", np.zeros(6000, np.int64))
        entries.append({"latents": name, "labels": f"labels_{k:05d}.npy", "count": 6000})
    manifest = {
        "format": "tread-latent-shards",
        "version": 1,
        "num_samples": 24000,
        "shape": [4, 32, 32],
        "dtype": "float16",
        "num_classes": 1,
        "scale_factor": None,
        "shards": entries,
    }
    (root / "index.json").write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in root.iterdir())
    assert size > 180 * 2**20

    def growth(mode: str) -> int:
        env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", _STREAM_SCRIPT, str(root), mode],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=True,
        ).stdout
        return json.loads(out.splitlines()[-1])["growth"]

    budget = 64 * 2**20
    streamed = growth("stream")
    assert streamed < budget, (
        f"resident set grew {streamed / 2**20:.0f} MB for a {size >> 20} MB set"
    )
    # The measurement sees mapped pages: keeping them (a plain memmap) blows the budget.
    assert growth("keep-pages") > 2 * budget


# --- writing: tread encode-latents ---------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """3 classes, 7 random RGB images (sizes differ: the centre crop is exercised)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, count in (("a", 3), ("b", 2), ("c", 2)):
        (root / name).mkdir()
        for i in range(count):
            size = (32 + 8 * i, 32)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def encode(image_dir, vae_dir, out, *extra):
    args = ["encode-latents", str(image_dir), str(out), "--vae", str(vae_dir)]
    return cli_main([*args, "--resolution", "32", "--batch-size", "2", "--workers", "0", *extra])


def everything(data: ImageArrays) -> tuple[torch.Tensor, torch.Tensor]:
    return data.take(torch.arange(len(data)))


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory, image_dir, vae_dir):
    out = tmp_path_factory.mktemp("npz") / "z.npz"
    assert encode(image_dir, vae_dir, out, "--hflip") == 0
    return out


def test_encode_writes_shards_equal_to_the_npz(tmp_path, image_dir, vae_dir, reference_npz, capsys):
    out = tmp_path / "z"
    # 7 images, shards of 3 (6 rows with mirrors), batches of 2: boundaries cross batches.
    assert encode(image_dir, vae_dir, out, "--hflip", "--shard-size", "3") == 0
    assert "in 3 shards" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["index.json"] + [
        f"{kind}_{k:05d}.npy" for kind in ("labels", "latents") for k in range(3)
    ]
    manifest = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [6, 6, 2]
    assert manifest["num_samples"] == 14 and manifest["shape"] == [4, 4, 4]
    assert manifest["dtype"] == "float16" and manifest["num_classes"] == 3
    assert manifest["hflip"] is True and manifest["resolution"] == 32
    assert manifest["vae"] == str(vae_dir.resolve()) and manifest["scale_factor"] is None
    labels = np.load(out / "labels_00000.npy").tolist()
    assert labels == [0, 0, 0, 0, 0, 0]  # 3 images of class a, then their mirrors
    assert np.load(out / "labels_00002.npy").tolist() == [2, 2]

    shards = load_dataset("latents", path=out)
    whole = load_dataset("latents", path=reference_npz)  # rows: 7 images, then 7 mirrors
    order = [0, 1, 2, 7, 8, 9, 3, 4, 5, 10, 11, 12, 6, 13]  # per shard: images, mirrors
    x, y = everything(shards)
    assert torch.equal(x, whole.images[order]) and torch.equal(y, whole.labels[order])


def test_interrupted_encode_resumes_after_complete_shards(
    tmp_path, image_dir, vae_dir, monkeypatch, capsys
):
    from tread.data import vae as vae_module

    out, fresh = tmp_path / "z", tmp_path / "fresh"
    assert encode(image_dir, vae_dir, fresh, "--shard-size", "3") == 0
    real_write = vae_module.write_shard

    def crash_at_shard_1(directory, k, latents, labels):
        if k == 1:
            raise KeyboardInterrupt  # the job was killed while shard 1 was being filled
        real_write(directory, k, latents, labels)

    monkeypatch.setattr(vae_module, "write_shard", crash_at_shard_1)
    assert encode(image_dir, vae_dir, out, "--shard-size", "3") == 130  # "interrupted"
    assert not (out / "index.json").exists() and (out / "latents_00000.npy").is_file()
    with pytest.raises(DataError, match="interrupted encode"):
        load_dataset("latents", path=out)
    (out / ".latents_00001.npy.123.abcd.tmp").write_bytes(b"half")  # left by a kill -9

    monkeypatch.setattr(vae_module, "write_shard", real_write)
    capsys.readouterr()
    assert encode(image_dir, vae_dir, out, "--shard-size", "4") == 2  # other settings
    err = capsys.readouterr().err.strip()
    assert "shard_size=3, now 4" in err and len(err.splitlines()) == 1
    encoded = []
    real_encode = vae_module.encode_images
    monkeypatch.setattr(
        vae_module,
        "encode_images",
        lambda v, x, **kw: encoded.append(len(x)) or real_encode(v, x, **kw),
    )
    capsys.readouterr()
    assert encode(image_dir, vae_dir, out, "--shard-size", "3") == 0
    assert "1 kept from an interrupted run" in capsys.readouterr().out
    assert sum(encoded) == 4  # images 3..6 only
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    (x, y), (x0, y0) = (
        everything(load_dataset("latents", path=out)),
        everything(load_dataset("latents", path=fresh)),
    )
    torch.testing.assert_close(x, x0, rtol=2e-3, atol=2e-3)  # batches regrouped: rounding only
    assert torch.equal(y, y0)


def test_encode_refuses_to_overwrite(tmp_path, image_dir, vae_dir, capsys):
    out = tmp_path / "z"
    assert encode(image_dir, vae_dir, out, "--shard-size", "4") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert encode(image_dir, vae_dir, out) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite starts over with the new settings; nothing of the old set stays behind.
    assert encode(image_dir, vae_dir, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "labels_00000.npy",
        "latents_00000.npy",
    ]
    # A directory holding anything else is never written to, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert encode(image_dir, vae_dir, other, "--overwrite") == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert encode(image_dir, vae_dir, tmp_path / "z.npz", "--shard-size", "4") == 2
    assert "directory" in capsys.readouterr().err


def test_training_reads_a_shard_directory(tmp_path, image_dir, vae_dir):
    from tread.train import train
    from tread.train.builders import load_data

    out = tmp_path / "z"
    assert encode(image_dir, vae_dir, out, "--shard-size", "3") == 0
    overrides = [
        "data.name=latents",
        f"data.path={out}",
        f"data.latent_scale={SCALE}",
        *TINY_LATENT_MODEL,
        "eval.every=0",
        "sample.grid_size=4",
        "sample.steps=2",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    config = load_config("digits_tread", overrides)
    data = load_data(config)
    assert isinstance(data.images, ShardedArray) and len(data) == 7 and data.scale == SCALE
    x, _ = everything(data)
    torch.testing.assert_close(x, everything(load_dataset("latents", path=out))[0] * SCALE)
    with pytest.raises(ConfigError, match="resolution=8"):
        load_dataset("latents", path=out, resolution=8)
    run = train(config, progress=False)
    assert run is not None
