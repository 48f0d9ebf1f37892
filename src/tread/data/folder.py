"""Image folders and ``.npz`` image arrays, resized and centre-cropped with PIL."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from tread.data.arrays import ImageArrays, classes_from_labels, to_unit_range
from tread.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ColorMode",
    "center_crop_resize",
    "load_image_folder",
    "load_npz_images",
    "read_images",
    "scan_image_folder",
]

ColorMode = Literal["RGB", "L"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Errors PIL raises for unreadable, truncated or hostile files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution``, then crop the centre square.

    Args:
        image: any PIL image.
        resolution: output side length in pixels.

    Returns:
        A ``resolution`` × ``resolution`` image of the same mode.
    """
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        # max(...) guards rounding a very thin side down below the crop size.
        new_w = max(resolution, round(w * scale))
        new_h = max(resolution, round(h * scale))
        # reducing_gap makes PIL box-downsample first on large reductions, which avoids the
        # aliasing a single bicubic step leaves when shrinking by more than 2x.
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _images_under(root: Path, recursive: bool) -> list[Path]:
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if _is_image(p))


def _read_image(path: Path, mode: ColorMode, resolution: int | None, name: str) -> np.ndarray:
    """Decode one file to an (H, W, C) uint8 array."""
    try:
        with Image.open(path) as img:
            img = img.convert(mode)  # convert() forces a full decode, so truncation shows here
    except _PIL_ERRORS as err:
        raise DataError(f"{name}: cannot read image {path}: {err}") from None
    if resolution is not None:
        img = center_crop_resize(img, resolution)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels  # "L" gives (H, W)


def _stack(arrays: list[np.ndarray], files: list[Path], name: str) -> np.ndarray:
    """Stack (H, W, C) arrays, naming the first file whose size differs."""
    first = arrays[0].shape
    for arr, file in zip(arrays, files, strict=True):
        if arr.shape != first:
            raise DataError(
                f"{name}: {file} is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is "
                f"{first[1]}x{first[0]}; set data.resolution= to resize"
            )
    return np.stack(arrays)


def _check_options(mode: str, resolution: int | None, name: str) -> None:
    if mode not in ("RGB", "L"):
        raise ConfigError(f"{name}: mode must be 'RGB' or 'L', got {mode!r}")
    if resolution is not None and resolution < 1:
        raise ConfigError(f"{name}: resolution must be positive, got {resolution}")


def scan_image_folder(path: str | Path, name: str = "folder") -> tuple[list[Path], list[int], int]:
    """List an image folder's files and labels (layouts as in :func:`load_image_folder`).

    Returns:
        (files in label order, labels, number of classes).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{name}: directory not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_images_under(d, recursive=True) for d in class_dirs]
    loose = _images_under(root, recursive=False)
    if any(per_class):
        if loose:
            raise DataError(
                f"{name}: {root} mixes loose images ({loose[0].name}) with class sub-directories"
            )
        for class_dir, files in zip(class_dirs, per_class, strict=True):
            if not files:
                # An empty class would silently shift every later label; refuse instead.
                raise DataError(f"{name}: class directory {class_dir} contains no images")
        files = [f for group in per_class for f in group]
        labels = [k for k, group in enumerate(per_class) for _ in group]
        return files, labels, len(class_dirs)
    if loose:
        return loose, [0] * len(loose), 1
    exts = ", ".join(IMAGE_EXTENSIONS)
    raise DataError(f"{name}: no images under {root} (looked for {exts})")


def read_images(
    files: Sequence[Path],
    resolution: int | None = None,  # None: keep the native size (all images must match)
    mode: ColorMode = "RGB",
    name: str = "folder",
) -> torch.Tensor:
    """Decode image files to a float32 (N, C, R, R) tensor in [-1, 1] (resize + centre crop)."""
    _check_options(mode, resolution, name)
    files = list(files)
    pixels = _stack([_read_image(f, mode, resolution, name) for f in files], files, name)
    return to_unit_range(pixels).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> NCHW


def load_image_folder(
    path: str | Path,
    resolution: int | None = None,  # None: keep the native size (all images must match)
    mode: ColorMode = "RGB",
    name: str = "folder",
) -> ImageArrays:
    """Load a folder of images scaled to [-1, 1].

    Layouts: ``path/<class>/**/<image>`` gives one class per sub-directory, labels assigned in
    sorted name order; ``path/<image>`` (no sub-directories with images) gives label 0.
    Hidden files and directories are skipped.

    Args:
        path: the folder.
        resolution: side of the square output (shorter side resized, centre cropped).
        mode: "RGB" (C=3) or "L" (grayscale, C=1).
        name: dataset name for messages and ``ImageArrays.name``.

    Returns:
        ImageArrays with images (N, C, R, R) and labels (N,).
    """
    _check_options(mode, resolution, name)
    files, labels, num_classes = scan_image_folder(path, name)
    return ImageArrays(
        images=read_images(files, resolution, mode, name),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=num_classes,
        name=name,
    )


def _npz_get(arrays: np.lib.npyio.NpzFile, keys: tuple[str, ...], path: Path, name: str):
    """Return the first present key's array, or None (reading a member may hit corruption)."""
    for key in keys:
        if key in arrays.files:
            try:
                return arrays[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise DataError(f"{name}: cannot read '{key}' from {path}: {err}") from None
    return None


def load_npz_images(
    path: str | Path,
    resolution: int | None = None,  # None: keep the stored size
    num_classes: int | None = None,  # default: max label + 1
    name: str = "npz",
) -> ImageArrays:
    """Load uint8 images from an ``.npz`` file, scaled to [-1, 1].

    The images are under ``images`` (or ``arr_0``, as ``np.savez`` names positional arrays)
    as (N, H, W, C), (N, C, H, W) or grayscale (N, H, W), C in {1, 3}. The layout is read from
    the shape: a last axis of 1 or 3 means NHWC (the ADM/EDM sample format), otherwise a second
    axis of 1 or 3 means NCHW. Labels come from ``labels`` (or ``arr_1``); without them every
    sample gets label 0.

    Args:
        path: the ``.npz`` file.
        resolution: if set and different from the stored size, each image is resized and
            centre-cropped to it with PIL.
        num_classes: number of classes; inferred from the labels when None.
        name: dataset name for messages and ``ImageArrays.name``.

    Returns:
        ImageArrays with images (N, C, H, W) and labels (N,).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{name}: cannot read {path} as .npz: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{name}: {path} is a single .npy array, expected an .npz archive")
    with archive:
        pixels = _npz_get(archive, ("images", "arr_0"), path, name)
        raw_labels = _npz_get(archive, ("labels", "arr_1"), path, name)
    if pixels is None:
        raise DataError(f"{name}: {path} has no 'images' or 'arr_0' array")
    if pixels.dtype != np.uint8:
        raise DataError(f"{name}: {path} images must be uint8, got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels[..., None]  # (N, H, W) -> (N, H, W, 1)
    if pixels.ndim != 4:
        raise DataError(f"{name}: {path} images must be 3-D or 4-D, got shape {pixels.shape}")
    if pixels.shape[0] == 0:
        raise DataError(f"{name}: {path} holds no images")
    if pixels.shape[-1] not in (1, 3):
        if pixels.shape[1] not in (1, 3):
            raise DataError(f"{name}: {path} images {pixels.shape} have no 1- or 3-channel axis")
        pixels = pixels.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if resolution is not None and pixels.shape[1:3] != (resolution, resolution):
        resized = []
        for img in pixels:
            # fromarray infers "L" from (H, W) uint8 and "RGB" from (H, W, 3) uint8.
            pil = Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img)
            arr = np.asarray(center_crop_resize(pil, resolution), dtype=np.uint8)
            resized.append(arr[:, :, None] if arr.ndim == 2 else arr)
        pixels = np.stack(resized)
    images = to_unit_range(pixels).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> NCHW
    if raw_labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
    else:
        if raw_labels.ndim != 1 or not np.issubdtype(raw_labels.dtype, np.integer):
            raise DataError(
                f"{name}: {path} labels must be 1-D integers, "
                f"got {raw_labels.dtype} {raw_labels.shape}"
            )
        labels = torch.from_numpy(raw_labels.astype(np.int64))
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{name}: {path} has {labels.shape[0]} labels for {images.shape[0]} images")
    classes = classes_from_labels(labels, num_classes, path, name)
    return ImageArrays(images=images, labels=labels, num_classes=classes, name=name)
