"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``): images <-> latents, offline.

diffusers is an optional extra (``pip install 'tread[vae]'``) imported only when a VAE is
loaded. Weights come from a local diffusers model folder (for example a downloaded
``stabilityai/sd-vae-ft-ema``); nothing is ever downloaded.

Latents are stored and returned *unscaled*: the training config multiplies them by
``data.latent_scale`` (0.18215 for SD-VAE), and :func:`decode_latents` divides by it again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tread.data.folder import load_npz_images, read_images, scan_image_folder
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


def _image_batches(
    src: Path, resolution: int, batch_size: int, workers: int
) -> tuple[int, int, Iterator[tuple[Tensor, Tensor]]]:
    """(count, classes, batches of (images in [-1, 1], labels)) from a folder or an .npz."""
    if src.is_file() and src.suffix.lower() == ".npz":
        data = load_npz_images(src, resolution=resolution, name="encode-latents")
        if data.images.shape[1] != 3:
            raise DataError(f"encode-latents: {src} holds {data.images.shape[1]}-channel images")
        pairs = zip(data.images.split(batch_size), data.labels.split(batch_size), strict=True)
        return len(data.labels), data.num_classes, iter(pairs)
    if not src.is_dir():
        raise DataError(f"encode-latents: {src} is neither an image folder nor an .npz file")
    # A folder is read batch by batch (ImageNet does not fit in memory as float32 pixels), with
    # up to `workers` batches decoded ahead in threads (PIL releases the GIL while decoding).
    files, labels, num_classes = scan_image_folder(src, name="encode-latents")
    starts = range(0, len(files), batch_size)

    def read(start: int) -> tuple[Tensor, Tensor]:
        chunk = files[start : start + batch_size]
        images = read_images(chunk, resolution, "RGB", name="encode-latents")
        return images, torch.tensor(labels[start : start + batch_size], dtype=torch.int64)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
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

    return len(files), num_classes, batches()


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``path`` in one step (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)


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
    progress: bool = False,
) -> EncodeResult:
    """Encode an image dataset into an ``.npz`` that ``load_dataset("latents", path=out)`` reads.

    Images are resized and centre-cropped to ``resolution`` as by ``load_dataset("folder")``,
    encoded to the posterior mean (see :func:`encode_images`) and stored unscaled as
    ``latents`` (N, C, h, w) with ``labels`` (N,). With ``hflip`` the latents of the mirrored
    images follow as rows N..2N-1, in the same order, with the same labels.

    Args:
        src: an image folder (one sub-directory per class, sorted names give labels 0..K-1) or
            an ``.npz`` of uint8 images (read into memory whole; use a folder for big sets).
        out: the ``.npz`` to write; written to a temporary file and renamed at the end.
        vae_path: local diffusers ``AutoencoderKL`` folder.
        resolution: image side before encoding; a multiple of the VAE's downsampling.
        batch_size: images per encoder call.
        device: where to run the VAE.
        dtype: stored latent dtype, "float16" (half the disk) or "float32".
        hflip: also store the latents of horizontally flipped images.
        overwrite: replace an existing ``out`` instead of refusing.
        workers: threads decoding image files ahead of the encoder (folders only; 0 = none).
        progress: show a tqdm bar.

    Returns:
        An :class:`EncodeResult`.
    """
    src, out = Path(src), Path(out)
    if out.suffix.lower() != ".npz":
        raise ConfigError(f"encode-latents: output must be an .npz file, got {out}")
    if out.exists() and not overwrite:
        raise ConfigError(f"encode-latents: {out} exists; pass --overwrite to replace it")
    if dtype not in LATENT_DTYPES:
        raise ConfigError(f"encode-latents: dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"encode-latents: batch_size must be positive, got {batch_size}")
    vae = load_vae(vae_path, device)
    factor = vae_downsampling(vae)
    if resolution < factor or resolution % factor:
        raise ConfigError(
            f"encode-latents: resolution={resolution} is not a multiple of the VAE's "
            f"downsampling factor {factor}"
        )
    count, num_classes, batches = _image_batches(src, resolution, batch_size, workers)
    side = resolution // factor
    shape = (vae.config.latent_channels, side, side)
    copies = 2 if hflip else 1
    latents = np.empty((copies * count, *shape), dtype=dtype)
    labels = np.empty(copies * count, dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="encoding", unit="img")
    done = 0
    for images, batch_labels in batches:
        views = [images, images.flip(-1)] if hflip else [images]  # flip W of (b, 3, H, W)
        for copy, view in enumerate(views):
            z = encode_images(vae, view, batch_size=batch_size)
            if not bool(torch.isfinite(z).all()):
                raise DataError(f"encode-latents: the VAE produced NaN/Inf near image {done}")
            if dtype == "float16" and float(z.abs().max()) > np.finfo(np.float16).max:
                raise DataError("encode-latents: latents overflow float16; use dtype float32")
            rows = slice(copy * count + done, copy * count + done + len(z))
            latents[rows] = z.cpu().numpy()
            labels[rows] = batch_labels.numpy()
        done += len(images)
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    _save_npz_atomic(out, latents=latents, labels=labels)
    return EncodeResult(out, copies * count, shape, num_classes)
