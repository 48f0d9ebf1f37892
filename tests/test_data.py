"""Datasets (digits, IDX, folders, npz, latents) and the BatchStream, on tiny synthetic data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tread.data import (
    DATASET_NAMES,
    BatchStream,
    ImageArrays,
    load_dataset,
    load_digits,
    load_idx_dir,
    load_image_folder,
    load_latents,
    load_npz_images,
    read_idx,
    write_idx,
)
from tread.data.digits import digits_split_indices
from tread.data.idx import IDX_SEARCH_DIRS
from tread.errors import CheckpointError, ConfigError, DataError

FASHION_DIR = Path(IDX_SEARCH_DIRS["fashion_mnist"][0])


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def write_idx_dir(root: Path, n_train=6, n_test=3, h=4, w=5, gz=True, seed=0) -> dict:
    """Write train/t10k IDX image and label files; return the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        labels[0] = 9  # so max label + 1 = 10 in every split
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (images, labels)
    return out


# --- digits ---------------------------------------------------------------------------------


def test_digits_shapes_range_classes_and_split():
    train, test, full = load_digits("train"), load_digits("test"), load_digits("all")
    assert len(full) == 1797 and len(test) == 1797 // 5 and len(train) == 1797 - 1797 // 5
    for data in (train, test, full):
        assert data.images.dtype == torch.float32 and data.shape == (1, 8, 8)
        assert data.images.min() == -1.0 and data.images.max() == 1.0
        assert data.num_classes == 10
        assert set(data.labels.tolist()) == set(range(10))
    train_idx, test_idx = digits_split_indices(1797, "train"), digits_split_indices(1797, "test")
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    assert torch.equal(test.images, full.images[test_idx])
    assert torch.equal(train.labels, full.labels[train_idx])
    # The split is fixed: loading again gives the same test set.
    assert torch.equal(load_digits("test").images, test.images)


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    written = write_idx_dir(tmp_path, gz=gz)
    images, labels = written["train"]
    suffix = ".gz" if gz else ""
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)
    data = load_idx_dir(tmp_path, "train")
    assert data.images.shape == (6, 1, 4, 5) and data.num_classes == 10
    expected = torch.from_numpy(images).float() / 127.5 - 1
    torch.testing.assert_close(data.images[:, 0], expected)
    assert torch.equal(data.labels, torch.from_numpy(labels).long())
    test = load_idx_dir(tmp_path, "test")
    assert torch.equal(test.labels, torch.from_numpy(written["t10k"][1]).long())
    both = load_idx_dir(tmp_path, "all")
    assert torch.equal(both.images, torch.cat([data.images, test.images]))


def test_idx_other_dtypes_round_trip(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.idx", array)), array)


def test_idx_pad_to(tmp_path):
    write_idx_dir(tmp_path, h=4, w=5)
    plain = load_idx_dir(tmp_path)
    padded = load_idx_dir(tmp_path, pad_to=8)
    assert padded.images.shape == (6, 1, 8, 8)
    # 4 -> 8 rows: 2 above; 5 -> 8 columns: 1 left (the odd pixel goes right).
    assert torch.equal(padded.images[:, :, 2:6, 1:6], plain.images)
    border = padded.images.clone()
    border[:, :, 2:6, 1:6] = -1.0
    assert bool((border == -1.0).all())
    with pytest.raises(ConfigError):
        load_idx_dir(tmp_path, pad_to=3)


@pytest.mark.parametrize("damage", ["truncate_plain", "truncate_gz", "bad_magic", "bad_gzip"])
def test_corrupt_idx_raises_data_error_naming_file(tmp_path, damage):
    write_idx_dir(tmp_path, gz=damage != "truncate_plain")
    suffix = "" if damage == "truncate_plain" else ".gz"
    target = tmp_path / f"train-images-idx3-ubyte{suffix}"
    raw = target.read_bytes()
    if damage in ("truncate_plain", "truncate_gz"):
        target.write_bytes(raw[: len(raw) - 7])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x01\x02\x08\x03" + gzip.decompress(raw)[4:]))
    else:
        target.write_bytes(raw[:10] + b"\xff" * 20 + raw[30:])
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path, name="fashion_mnist")
    message = one_line(err)
    assert str(target) in message and message.startswith("fashion_mnist:")


def test_idx_label_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_idx_dir(tmp_path)


def test_missing_idx_directory_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", path=missing)
    assert str(missing) in one_line(err)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", path=tmp_path)
    message = one_line(err)
    assert str(tmp_path) in message and "train-images-idx3-ubyte[.gz]" in message


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_auto_detect():
    train = load_dataset("fashion_mnist")
    assert train.images.shape == (60000, 1, 28, 28) and train.labels.shape == (60000,)
    assert train.num_classes == 10 and set(train.labels.unique().tolist()) == set(range(10))
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    test = load_dataset("fashion_mnist", split="test", pad_to=32)
    assert test.images.shape == (10000, 1, 32, 32)
    assert bool((test.images[:, :, :2] == -1).all()) and bool((test.images[..., -2:] == -1).all())


# --- folders and npz ------------------------------------------------------------------------


def save_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_classes(tmp_path):
    # "b_cat" sorts before "c_dog": labels follow names, not creation order.
    save_png(tmp_path / "c_dog" / "1.png", (12, 8), (255, 0, 0))
    save_png(tmp_path / "b_cat" / "sub" / "2.jpg", (8, 16), (0, 0, 255))
    save_png(tmp_path / "b_cat" / "3.png", (6, 6), (0, 255, 0))
    (tmp_path / "c_dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path, resolution=4)
    assert data.images.shape == (3, 3, 4, 4) and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.min() >= -1 and data.images.max() <= 1
    # b_cat/3.png (sorted before sub/2.jpg) is pure green.
    torch.testing.assert_close(data.images[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    gray = load_image_folder(tmp_path, resolution=4, mode="L")
    assert gray.images.shape == (3, 1, 4, 4)


def test_flat_image_folder_and_errors(tmp_path):
    save_png(tmp_path / "a.png", (5, 5), (10, 20, 30))
    save_png(tmp_path / "b.png", (5, 5), (10, 20, 30))
    data = load_image_folder(tmp_path)  # native size: all 5x5
    assert data.images.shape == (2, 3, 5, 5) and data.labels.tolist() == [0, 0]
    assert data.num_classes == 1
    save_png(tmp_path / "c.png", (6, 5), (0, 0, 0))
    with pytest.raises(DataError, match="resolution="):
        load_image_folder(tmp_path)
    broken = tmp_path / "d.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, resolution=4)
    assert str(broken) in one_line(err)
    with pytest.raises(DataError, match="directory not found"):
        load_image_folder(tmp_path / "missing", resolution=4)


def test_image_folder_empty_class_is_an_error(tmp_path):
    save_png(tmp_path / "a" / "1.png", (4, 4), (0, 0, 0))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="contains no images"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "gray"])
def test_npz_images(tmp_path, layout):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2])
    if layout == "nhwc":
        np.savez(tmp_path / "x.npz", images=nhwc, labels=labels)
    elif layout == "nchw":
        np.savez(tmp_path / "x.npz", nhwc.transpose(0, 3, 1, 2), labels)  # arr_0, arr_1
    else:
        np.savez(tmp_path / "x.npz", nhwc[..., 0])  # (N, H, W), no labels
    data = load_npz_images(tmp_path / "x.npz")
    if layout == "gray":
        assert data.images.shape == (4, 1, 6, 6) and data.labels.tolist() == [0] * 4
        expected = nhwc[..., :1]
    else:
        assert data.images.shape == (4, 3, 6, 6) and data.labels.tolist() == labels.tolist()
        assert data.num_classes == 3
        expected = nhwc
    reference = torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(data.images, reference)
    assert load_npz_images(tmp_path / "x.npz", resolution=4).images.shape[-2:] == (4, 4)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_npz_images(tmp_path / "float.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError) as err:
        load_npz_images(tmp_path / "junk.npz")
    assert str(tmp_path / "junk.npz") in one_line(err)
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=[1, 2, 3])
    with pytest.raises(DataError, match="3 labels for 2 images"):
        load_npz_images(tmp_path / "labels.npz")


# --- latents --------------------------------------------------------------------------------


def make_latents(n=5, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latents = (rng.standard_normal((n, 4, 2, 2)) * 3).astype(np.float32)  # beyond [-1, 1]
    return latents, np.arange(n) % 3


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "npy"])
def test_latents_formats_and_scale(tmp_path, fmt):
    latents, labels = make_latents()
    if fmt == "npz":
        path = tmp_path / "z.npz"
        np.savez(path, latents=latents, labels=labels, scale_factor=np.float32(0.5))
    elif fmt == "safetensors":
        path = tmp_path / "z.safetensors"
        tensors = {"latents": torch.from_numpy(latents), "labels": torch.from_numpy(labels)}
        save_file(tensors, str(path), metadata={"scale_factor": "0.5"})
    else:
        path = tmp_path / "latents.npy"
        np.save(path, latents)
        np.save(tmp_path / "labels.npy", labels)
    data = load_latents(path)
    assert data.latent and data.images.shape == (5, 4, 2, 2) and data.num_classes == 3
    stored_scale = 1.0 if fmt == "npy" else 0.5
    torch.testing.assert_close(data.images, torch.from_numpy(latents) * stored_scale)
    assert data.labels.tolist() == labels.tolist()
    # An explicit scale factor wins over the stored one.
    torch.testing.assert_close(
        load_latents(path, scale_factor=2.0).images, torch.from_numpy(latents) * 2.0
    )


def test_latents_memmap_matches_in_memory(tmp_path):
    latents, labels = make_latents(n=7)
    np.save(tmp_path / "latents.npy", latents.astype(np.float16))
    np.save(tmp_path / "labels.npy", labels)
    lazy = load_latents(tmp_path, scale_factor=0.25, mmap=True)
    eager = load_latents(tmp_path, scale_factor=0.25)
    assert isinstance(lazy.images, np.memmap)
    idx = torch.tensor([6, 0, 3, 3, 1])
    lazy_x, lazy_y = lazy.take(idx)
    eager_x, eager_y = eager.take(idx)
    assert lazy_x.dtype == torch.float32
    torch.testing.assert_close(lazy_x, eager_x)
    assert torch.equal(lazy_y, eager_y)


def test_latents_errors(tmp_path):
    latents, _ = make_latents()
    np.savez(tmp_path / "nolatents.npz", other=latents)
    with pytest.raises(DataError, match="no 'latents'"):
        load_latents(tmp_path / "nolatents.npz")
    bad = latents.copy()
    bad[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", latents=bad)
    with pytest.raises(DataError, match="NaN"):
        load_latents(tmp_path / "nan.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(DataError) as err:
        load_latents(tmp_path / "junk.safetensors")
    assert str(tmp_path / "junk.safetensors") in one_line(err)
    with pytest.raises(ConfigError, match="mmap"):
        load_latents(tmp_path / "nan.npz", mmap=True)


@pytest.mark.parametrize("kind", ["npz", "latents_npz", "latents_safetensors", "idx"])
def test_absurd_label_is_refused_naming_file_and_value(tmp_path, kind):
    # Label 1e9 used to become num_classes = 1e9 + 1 and a 512 GB class embedding.
    labels = np.array([0, 1_000_000_000, 1])
    if kind == "npz":
        path = tmp_path / "big.npz"
        np.savez(path, images=np.zeros((3, 4, 4, 1), np.uint8), labels=labels)
        load = lambda: load_npz_images(path)  # noqa: E731
    elif kind == "latents_npz":
        path = tmp_path / "big.npz"
        np.savez(path, latents=np.zeros((3, 4, 2, 2), np.float32), labels=labels)
        load = lambda: load_latents(path)  # noqa: E731
    elif kind == "latents_safetensors":
        path = tmp_path / "big.safetensors"
        save_file({"latents": torch.zeros(3, 4, 2, 2), "labels": torch.from_numpy(labels)}, path)
        load = lambda: load_latents(path)  # noqa: E731
    else:
        path = tmp_path
        write_idx(path / "train-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
        write_idx(path / "train-labels-idx1-ubyte", labels.astype(np.int32))
        load = lambda: load_idx_dir(path)  # noqa: E731
    with pytest.raises(DataError) as err:
        load()
    message = one_line(err)
    assert str(path) in message and "1000000000" in message


def test_label_beyond_declared_classes_names_file(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0, 7]))
    with pytest.raises(DataError) as err:
        load_npz_images(path, num_classes=5)
    assert str(path) in one_line(err) and "label 7" in one_line(err)
    np.savez(path, images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0, -2]))
    with pytest.raises(DataError, match="negative label -2"):
        load_npz_images(path)


def test_missing_fashion_mnist_names_the_config_key(monkeypatch, tmp_path):
    monkeypatch.setitem(IDX_SEARCH_DIRS, "fashion_mnist", (str(tmp_path / "none"),))
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist")
    message = one_line(err)
    assert "set data.path=" in message and "pass path=" not in message
    with pytest.raises(ConfigError, match="idx: data.path= is required"):
        load_dataset("idx")
    with pytest.raises(ConfigError, match="npz: data.path= is required"):
        load_dataset("npz")
    with pytest.raises(ConfigError, match="data.resolution=8 conflicts with data.pad_to=32"):
        load_dataset("mnist", path=tmp_path, resolution=8, pad_to=32)


# --- load_dataset dispatch ------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_load_dataset_every_name(tmp_path, name):
    if name in ("fashion_mnist", "mnist", "idx"):
        write_idx_dir(tmp_path)
        path, expected = tmp_path, (6, 1, 8, 8)
        data = load_dataset(name, path=path, resolution=8)
    elif name == "folder":
        save_png(tmp_path / "x" / "a.png", (10, 7), (1, 2, 3))
        data, expected = load_dataset(name, path=tmp_path, resolution=6), (1, 3, 6, 6)
    elif name == "npz":
        np.savez(tmp_path / "x.npz", images=np.zeros((2, 5, 5, 1), np.uint8))
        data, expected = load_dataset(name, path=tmp_path / "x.npz"), (2, 1, 5, 5)
    elif name == "latents":
        np.savez(tmp_path / "z.npz", latents=make_latents()[0])
        data = load_dataset(name, path=tmp_path / "z.npz", resolution=2, scale_factor=0.5)
        expected = (5, 4, 2, 2)
    else:
        data, expected = load_dataset(name, split="test"), (359, 1, 8, 8)
    assert isinstance(data, ImageArrays) and tuple(data.images.shape) == expected
    assert data.name == name


def test_load_dataset_rejects_bad_names_and_options(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10")  # type: ignore[arg-type]
    message = one_line(err)
    assert "'cifar10'" in message and all(n in message for n in DATASET_NAMES)
    with pytest.raises(ConfigError, match="pad_to"):
        load_dataset("digits", pad_to=32)
    with pytest.raises(ConfigError, match="8x8"):
        load_dataset("digits", resolution=16)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="val")  # type: ignore[arg-type]
    np.savez(tmp_path / "z.npz", latents=make_latents()[0])
    with pytest.raises(ConfigError, match="test split"):
        load_dataset("latents", path=tmp_path / "z.npz", split="test")
    with pytest.raises(ConfigError, match="resolution=4"):
        load_dataset("latents", path=tmp_path / "z.npz", resolution=4)


def test_image_arrays_validation():
    images, labels = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2])
    ImageArrays(images, labels, num_classes=3, name="ok")
    with pytest.raises(DataError, match="float32"):
        ImageArrays(images.double(), labels, num_classes=3, name="x")
    with pytest.raises(DataError, match="num_classes"):
        ImageArrays(images, labels, num_classes=2, name="x")
    with pytest.raises(DataError, match="labels"):
        ImageArrays(images, labels[:2], num_classes=3, name="x")
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        ImageArrays(images[0], labels, num_classes=3, name="x")


# --- BatchStream ----------------------------------------------------------------------------


def indexed_data(n: int = 10) -> ImageArrays:
    """Sample i is (1, 2, 3) with values 6i..6i+5: unique, and different from its own flip."""
    images = torch.arange(n * 6, dtype=torch.float32).reshape(n, 1, 2, 3)
    return ImageArrays(images, torch.arange(n) % 4, num_classes=4, name="indexed")


def identify(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Recover (sample index, was flipped) for each image of an indexed_data batch."""
    ids, flipped = [], []
    for img in images:
        i = int(img.min()) // 6
        original = torch.arange(i * 6, i * 6 + 6, dtype=torch.float32).reshape(1, 2, 3)
        assert torch.equal(img, original) or torch.equal(img, original.flip(-1))
        ids.append(i)
        flipped.append(not torch.equal(img, original))
    return ids, flipped


def take(stream: BatchStream, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(steps)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_stream_same_seed_same_batches_and_epochs_cover_data():
    data = indexed_data(12)
    a = take(BatchStream(data, batch_size=4, seed=3, hflip=True), 9)
    assert_same_batches(a, take(BatchStream(data, batch_size=4, seed=3, hflip=True), 9))
    other = take(BatchStream(data, batch_size=4, seed=4, hflip=True), 9)
    assert any(not torch.equal(x, y) for (x, _), (y, _) in zip(a, other, strict=True))
    for epoch in range(3):  # 12 / 4 = 3 steps per epoch, each a permutation of the data
        ids = [i for x, _ in a[3 * epoch : 3 * epoch + 3] for i in identify(x)[0]]
        assert sorted(ids) == list(range(12))
    first_epoch = [i for x, _ in a[:3] for i in identify(x)[0]]
    second_epoch = [i for x, _ in a[3:6] for i in identify(x)[0]]
    assert first_epoch != second_epoch  # a fresh permutation each epoch


@pytest.mark.parametrize("drop_last", [True, False])
def test_stream_resume_mid_epoch_matches_uninterrupted(drop_last):
    data = indexed_data(10)  # 10 is not a multiple of 3: exercises the epoch boundary
    reference = take(BatchStream(data, 3, seed=7, hflip=True, drop_last=drop_last), 9)
    first = BatchStream(data, 3, seed=7, hflip=True, drop_last=drop_last)
    head = take(first, 2)  # stop mid-epoch
    state = first.state_dict()
    resumed = BatchStream(data, 3, seed=7, hflip=True, drop_last=drop_last)
    resumed.load_state_dict(state)
    tail = take(resumed, 7)  # runs across at least two epoch boundaries
    assert resumed.epoch >= 2
    assert_same_batches(reference, head + tail)


def test_stream_drop_last_semantics():
    data = indexed_data(10)
    kept = take(BatchStream(data, 4, seed=0, drop_last=True), 2)  # one epoch = 2 batches
    ids = [i for x, _ in kept for i in identify(x)[0]]
    assert len(set(ids)) == 8
    straddle = BatchStream(data, 4, seed=0, drop_last=False)
    ids = [i for x, _ in take(straddle, 5) for i in identify(x)[0]]  # 20 = exactly two epochs
    assert sorted(ids) == sorted(list(range(10)) * 2)
    assert straddle.epoch == 2


def test_two_ranks_concatenate_to_one_rank_double_batch():
    data = indexed_data(11)
    single = BatchStream(data, batch_size=4, seed=5, hflip=True)
    ranks = [
        BatchStream(data, batch_size=2, seed=5, rank=r, world_size=2, hflip=True) for r in (0, 1)
    ]
    for _ in range(8):  # crosses several epoch boundaries
        x, y = next(single)
        parts = [next(stream) for stream in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    # A checkpoint written by the 2-rank run resumes the 1-rank run in lockstep.
    single_resumed = BatchStream(data, batch_size=4, seed=5, hflip=True)
    single_resumed.load_state_dict(ranks[0].state_dict())
    assert_same_batches(take(single_resumed, 3), take(single, 3))


def test_flips_flip_some_samples_and_keep_labels():
    data = indexed_data(10)
    stream = BatchStream(data, batch_size=5, seed=1, hflip=True)
    flips = []
    for x, y in take(stream, 8):
        ids, flipped = identify(x)
        assert y.tolist() == data.labels[ids].tolist()  # labels follow their own sample
        flips += flipped
    assert 0 < sum(flips) < len(flips)
    no_flip = BatchStream(data, batch_size=5, seed=1, hflip=False)
    assert not any(f for x, _ in take(no_flip, 8) for f in identify(x)[1])


def test_stream_rejects_bad_settings_and_mismatched_state():
    data = indexed_data(6)
    with pytest.raises(ConfigError):
        BatchStream(data, batch_size=4, seed=0, world_size=2)  # 8 > 6 with drop_last
    with pytest.raises(ConfigError):
        BatchStream(data, batch_size=2, seed=0, rank=2, world_size=2)
    state = BatchStream(data, batch_size=2, seed=0).state_dict()
    with pytest.raises(CheckpointError, match="seed"):
        BatchStream(data, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="global_batch_size"):
        BatchStream(data, batch_size=3, seed=0).load_state_dict(state)
