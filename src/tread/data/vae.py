"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``): images <-> latents, offline.

diffusers is an optional extra (``pip install 'tread[vae]'``) imported only when a VAE is
loaded. Weights come from a local diffusers model folder (for example a downloaded
``stabilityai/sd-vae-ft-ema``); nothing is ever downloaded.

Latents are stored and returned *unscaled*: the training config multiplies them by
``data.latent_scale`` (0.18215 for SD-VAE), and :func:`decode_latents` divides by it again.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tread.data.folder import load_npz_images, read_images, scan_image_folder
from tread.data.latents import LATENT_SUFFIXES
from tread.data.shards import (
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    finish_shard_dir,
    num_shards,
    prepare_shard_dir,
    write_shard,
)
from tread.errors import ConfigError, DataError
from tread.paths import atomic_open

__all__ = [
    "EncodeResult",
    "decode_latents",
    "encode_dataset",
    "encode_images",
    "latent_decoder",
    "load_vae",
    "vae_downsampling",
]

LATENT_DTYPES = ("float16", "float32")


def _autoencoder_class() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ConfigError(
            f"the VAE needs diffusers, which is not installed ({err}); "
            "install it with: pip install 'tread[vae]'"
        ) from None
    return AutoencoderKL


def load_vae(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """Load an ``AutoencoderKL`` from a local diffusers folder, frozen and in eval mode.

    Args:
        path: a folder with ``config.json`` and the weights (``save_pretrained`` layout), or a
            full Stable Diffusion pipeline folder whose ``vae/`` sub-folder has them.
        device: where to put it.
        dtype: parameter dtype. float32 is the safe choice; some VAEs overflow in float16.

    Returns:
        The ``diffusers.AutoencoderKL``.

    Raises:
        ConfigError: diffusers is missing, or ``path`` is not a readable VAE folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"VAE folder not found: {path}")
    subfolder = None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        subfolder = "vae"  # a whole pipeline folder
    elif not (path / "config.json").is_file():
        raise ConfigError(f"VAE folder {path} has no config.json (expected a diffusers model)")
    autoencoder = _autoencoder_class()
    try:
        # low_cpu_mem_usage=False: the VAE is small (84M parameters for SD), and this way
        # diffusers does not ask for accelerate.
        vae = autoencoder.from_pretrained(
            path,
            subfolder=subfolder,
            torch_dtype=dtype,
            local_files_only=True,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load a VAE from {path}: {first_line}") from None
    return vae.requires_grad_(False).eval().to(device)


def vae_downsampling(vae: Any) -> int:
    """Pixels per latent along each side (8 for SD-VAE: one per encoder block after the first)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _placement(vae: Any) -> tuple[torch.device, torch.dtype]:
    param = next(vae.parameters())
    return param.device, param.dtype


@torch.no_grad()
def encode_images(
    vae: Any,
    images: Tensor,
    *,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Encode images to unscaled latents.

    The encoder gives a diagonal Gaussian posterior per image; by default its **mean** is
    returned, so encoding is deterministic. With ``generator`` a sample is drawn from the
    posterior instead (reproducible for a given generator state).

    Args:
        vae: an ``AutoencoderKL`` (see :func:`load_vae`).
        images: (B, 3, H, W) in [-1, 1], on any device; H and W divisible by
            :func:`vae_downsampling` (8 for SD-VAE).
        batch_size: images per encoder call.
        generator: draw posterior samples with it instead of taking the mean.

    Returns:
        float32 latents (B, latent_channels, H/f, W/f) on ``images.device``, not multiplied
        by any scale factor.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"VAE: expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
    factor = vae_downsampling(vae)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise DataError(
            f"VAE: image size {images.shape[2]}x{images.shape[3]} is not divisible by {factor}"
        )
    device, dtype = _placement(vae)
    out = []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk.to(device, dtype)).latent_dist
        z = posterior.mean if generator is None else posterior.sample(generator=generator)
        out.append(z.float().to(images.device))
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor, scale: float, *, batch_size: int = 32) -> Tensor:
    """Decode latents to images: divide by ``scale`` (``data.latent_scale``), then decode.

    Args:
        vae: an ``AutoencoderKL``.
        latents: (B, latent_channels, h, w) as the model sees them, i.e. multiplied by
            ``scale``; any device.
        scale: the factor applied at training time (0.18215 for SD-VAE; 1 for raw latents).
        batch_size: latents per decoder call.

    Returns:
        float32 images (B, 3, h*f, w*f) clamped to [-1, 1], on ``latents.device``.
    """
    channels = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise DataError(f"VAE: expected latents (B, {channels}, h, w), got {tuple(latents.shape)}")
    device, dtype = _placement(vae)
    out = []
    for chunk in latents.split(batch_size):
        x = vae.decode((chunk.float() / scale).to(device, dtype)).sample
        out.append(x.float().clamp(-1, 1).to(latents.device))
    return torch.cat(out)


def latent_decoder(
    vae_path: str | Path | None,
    *,
    latent: bool,  # the model generates VAE latents (a run with data.name=latents)
    scale: float = 1.0,  # data.latent_scale: the factor the latents were multiplied by
    channels: int | None = None,  # model.in_channels, checked against the VAE
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> Callable[[Tensor], Tensor] | None:
    """What turns a model's samples into images: None for pixel models, a VAE decode otherwise.

    Args:
        vae_path: the VAE folder; required for latent models, ignored for pixel models.
        latent: whether the model generates latents; False returns None.
        scale: the latent scale the model was trained with (0.18215 for SD-VAE).
        channels: the model's channels; a VAE with another latent width is refused.
        device: where to run the decoder.
        batch_size: latents per decoder call (the decoder's activations at full resolution,
            not the sampler, bound memory here).

    Returns:
        None, or a function mapping (B, C, h, w) samples to (B, 3, H, W) images in [-1, 1].

    Raises:
        ConfigError: no VAE for a latent model, an unloadable VAE, or a channel mismatch.
    """
    if not latent:
        return None
    if not vae_path:
        raise ConfigError(
            "this checkpoint generates VAE latents (data.name=latents); pass --vae PATH, "
            "a local diffusers AutoencoderKL folder such as sd-vae-ft-ema, to decode them"
        )
    vae = load_vae(vae_path, device)
    if channels is not None and vae.config.latent_channels != channels:
        raise ConfigError(
            f"VAE {vae_path} has {vae.config.latent_channels} latent channels but the model "
            f"generates {channels}"
        )

    def decode(latents: Tensor) -> Tensor:
        return decode_latents(vae, latents, scale, batch_size=batch_size)

    return decode


@dataclass(frozen=True)
class EncodeResult:
    """What :func:`encode_dataset` wrote."""

    path: Path
    num_latents: int  # images, twice that with hflip
    latent_shape: tuple[int, int, int]  # (C, h, w)
    num_classes: int
    num_shards: int = 1  # shard files (1: an .npz)
    resumed_shards: int = 0  # complete shards an interrupted encode left, kept as they were


@dataclass(frozen=True)
class _Source:
    """The images to encode: how many, their classes, what identifies them, how to read them."""

    count: int
    num_classes: int
    fingerprint: str  # sha256 of the file list + labels (folder) or the pixels + labels (.npz)
    read: Callable[[int, int], tuple[Tensor, Tensor]]  # (start, stop) -> images, labels


def _scan_source(src: Path, resolution: int) -> _Source:
    """An image folder (read lazily, batch by batch) or an ``.npz`` of images (read whole)."""
    if src.is_file() and src.suffix.lower() == ".npz":
        data = load_npz_images(src, resolution=resolution, name="encode-latents")
        if data.images.shape[1] != 3:
            raise DataError(f"encode-latents: {src} holds {data.images.shape[1]}-channel images")
        digest = hashlib.sha256(np.ascontiguousarray(data.images.numpy()))
        digest.update(np.ascontiguousarray(data.labels.numpy()))

        def read_array(start: int, stop: int) -> tuple[Tensor, Tensor]:
            return data.images[start:stop], data.labels[start:stop]

        return _Source(len(data.labels), data.num_classes, digest.hexdigest(), read_array)
    if not src.is_dir():
        raise DataError(f"encode-latents: {src} is neither an image folder nor an .npz file")
    # A folder is read batch by batch: ImageNet does not fit in memory as float32 pixels.
    files, labels, num_classes = scan_image_folder(src, name="encode-latents")
    digest = hashlib.sha256()
    for file, label in zip(files, labels, strict=True):
        digest.update(f"{file.relative_to(src).as_posix()}\t{label}\n".encode())

    def read_files(start: int, stop: int) -> tuple[Tensor, Tensor]:
        images = read_images(files[start:stop], resolution, "RGB", name="encode-latents")
        return images, torch.tensor(labels[start:stop], dtype=torch.int64)

    return _Source(len(files), num_classes, digest.hexdigest(), read_files)


def _image_batches(
    source: _Source, first: int, batch_size: int, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images in [-1, 1], labels) from image ``first`` on, with up to ``workers`` batches read
    ahead in threads (PIL releases the GIL while decoding)."""
    starts = range(first, source.count, batch_size)

    def read(start: int) -> tuple[Tensor, Tensor]:
        return source.read(start, min(start + batch_size, source.count))

    if workers < 1:
        yield from map(read, starts)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(read, start))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``path`` in one step (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)


def _encode_checked(
    vae: Any, images: Tensor, copies: int, batch_size: int, dtype: str, first: int
) -> np.ndarray:
    """Latents (copies, b, C, h, w) of ``images`` (b, 3, H, W) and, with 2 copies, their
    mirrors, as ``dtype``; refuses NaN/Inf and float16 overflow (``first``: image number)."""
    out = []
    views = [images] if copies == 1 else [images, images.flip(-1)]  # flip W of (b, 3, H, W)
    for view in views:
        z = encode_images(vae, view, batch_size=batch_size)
        if not bool(torch.isfinite(z).all()):
            raise DataError(f"encode-latents: the VAE produced NaN/Inf near image {first}")
        if dtype == "float16" and float(z.abs().max()) > np.finfo(np.float16).max:
            raise DataError("encode-latents: latents overflow float16; use dtype float32")
        out.append(z.cpu().numpy().astype(dtype))
    return np.stack(out)  # copies x (b, C, h, w) -> (copies, b, C, h, w)


def _fill_shards(
    encode: Callable[[Tensor, int], np.ndarray],  # (images, first image) -> (copies, b, C, h, w)
    batches: Iterator[tuple[Tensor, Tensor]],
    save: Callable[[int, np.ndarray, np.ndarray], None],  # (k, latents, labels) of shard k
    *,
    first: int,  # first image to encode: a shard boundary
    count: int,  # images in the source
    shard_size: int,  # images per shard (the last one may hold fewer)
    bar: Any = None,
) -> None:
    """Encode ``batches`` into consecutive shards, calling ``save`` as each one fills.

    Only the shard being filled is in memory. Batches need not align with shards: a batch
    that crosses a boundary completes one shard and starts the next. A shard of n images is
    stored as its n latents, then (with mirrors) the n mirrored ones: rows i and n + i are one
    image.
    """
    pos = first  # next image to place
    buffer: np.ndarray | None = None
    labels = np.empty(0, np.int64)
    for images, batch_labels in batches:
        z = encode(images, pos)  # (copies, b, C, h, w)
        used = 0
        while used < len(images):
            k = pos // shard_size
            lo, n = k * shard_size, min(shard_size, count - k * shard_size)
            if buffer is None:
                buffer = np.empty((z.shape[0], n, *z.shape[2:]), z.dtype)  # (copies, n, C, h, w)
                labels = np.empty(n, np.int64)
            take = min(len(images) - used, lo + n - pos)
            buffer[:, pos - lo : pos - lo + take] = z[:, used : used + take]
            labels[pos - lo : pos - lo + take] = batch_labels[used : used + take].numpy()
            pos, used = pos + take, used + take
            if pos == lo + n:
                copies = buffer.shape[0]
                # (copies, n, C, h, w) -> (copies * n, C, h, w): the images, then their mirrors
                save(k, buffer.reshape(copies * n, *buffer.shape[2:]), np.tile(labels, copies))
                buffer = None
        if bar is not None:
            bar.update(len(images))
    if pos != count:
        raise DataError(f"encode-latents: the source gave {pos} images, expected {count}")


def encode_dataset(
    src: str | Path,
    out: str | Path,
    vae_path: str | Path,
    *,
    resolution: int = 256,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    dtype: str = "float16",
    hflip: bool = False,
    overwrite: bool = False,
    workers: int = 4,
    shard_size: int | None = None,
    progress: bool = False,
) -> EncodeResult:
    """Encode an image dataset into latents that ``load_dataset("latents", path=out)`` reads.

    Images are resized and centre-cropped to ``resolution`` as by ``load_dataset("folder")``,
    encoded to the posterior mean (see :func:`encode_images`) and stored unscaled.

    ``out`` is a **shard directory** unless it ends in ``.npz``: ``latents_00000.npy``
    (n, C, h, w) + ``labels_00000.npy`` (n,) per ``shard_size`` images, each written whole by
    rename, and ``index.json`` last (see :mod:`tread.data.shards`). Only one shard is in
    memory. An interrupted encode is resumed by running it again with the same settings: the
    complete shards are kept and encoding restarts at the first missing one. An ``.npz`` holds
    ``latents`` (N, C, h, w) and ``labels`` (N,), built in memory and written at the end (small
    sets). With ``hflip`` each shard (or the ``.npz``) holds its n images' latents, then the n
    mirrored images' latents in the same order, with the same labels.

    Args:
        src: an image folder (one sub-directory per class, sorted names give labels 0..K-1) or
            an ``.npz`` of uint8 images (read into memory whole; use a folder for big sets).
        out: the shard directory, or the ``.npz`` file, to write.
        vae_path: local diffusers ``AutoencoderKL`` folder.
        resolution: image side before encoding; a multiple of the VAE's downsampling.
        batch_size: images per encoder call.
        device: where to run the VAE.
        dtype: stored latent dtype, "float16" (half the disk) or "float32".
        hflip: also store the latents of horizontally flipped images.
        overwrite: replace a complete ``out`` (or an interrupted one with other settings)
            instead of refusing.
        workers: threads decoding image files ahead of the encoder (0 = none).
        shard_size: images per shard (directories only; default ``DEFAULT_SHARD_SIZE``).
        progress: show a tqdm bar.

    Returns:
        An :class:`EncodeResult`.

    Raises:
        ConfigError: a bad option, an ``out`` that exists (see ``overwrite``), or a VAE that
            cannot be loaded.
        DataError: an unreadable source, or latents that are NaN/Inf or overflow float16.
    """
    src, out = Path(src), Path(out)
    single = out.suffix.lower() == ".npz"
    if not single and out.suffix.lower() in LATENT_SUFFIXES:
        raise ConfigError(f"encode-latents: OUT must be a directory or an .npz file, got {out}")
    if single and shard_size is not None:
        raise ConfigError(f"encode-latents: --shard-size needs a directory OUT, not {out}")
    if not overwrite and (out.exists() if single else (out / MANIFEST_NAME).is_file()):
        raise ConfigError(f"encode-latents: {out} exists; pass --overwrite to replace it")
    if dtype not in LATENT_DTYPES:
        raise ConfigError(f"encode-latents: dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    for key, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value is not None and value < 1:
            raise ConfigError(f"encode-latents: {key} must be positive, got {value}")
    vae = load_vae(vae_path, device)
    factor = vae_downsampling(vae)
    if resolution < factor or resolution % factor:
        raise ConfigError(
            f"encode-latents: resolution={resolution} is not a multiple of the VAE's "
            f"downsampling factor {factor}"
        )
    source = _scan_source(src, resolution)
    shape = (vae.config.latent_channels, resolution // factor, resolution // factor)
    copies = 2 if hflip else 1
    size = source.count if single else shard_size or DEFAULT_SHARD_SIZE
    settings: dict[str, Any] = {
        "num_images": source.count,
        "shard_size": size,
        "hflip": hflip,
        "shape": list(shape),
        "dtype": dtype,
        "num_classes": source.num_classes,
        "resolution": resolution,
        "source": str(src.resolve()),
        "source_sha256": source.fingerprint,  # resuming needs the same images
        "vae": str(Path(vae_path).resolve()),
        "vae_scaling_factor": getattr(vae.config, "scaling_factor", None),
    }
    if single:
        first_shard = 0

        def save(k: int, latents: np.ndarray, labels: np.ndarray) -> None:
            _save_npz_atomic(out, latents=latents, labels=labels)

    else:
        first_shard = prepare_shard_dir(out, settings, overwrite=overwrite)
        save = partial(write_shard, out)
    first = min(first_shard * size, source.count)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=source.count, initial=first, desc="encoding", unit="img")
    try:
        _fill_shards(
            lambda images, at: _encode_checked(vae, images, copies, batch_size, dtype, at),
            _image_batches(source, first, batch_size, workers),
            save,
            first=first,
            count=source.count,
            shard_size=size,
            bar=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if not single:
        finish_shard_dir(out, settings)
    shards = num_shards(settings)
    return EncodeResult(out, copies * source.count, shape, source.num_classes, shards, first_shard)
