"""Fréchet distance in a latent model's own latent space ("fd_latent"), with no image network.

A latent run's in-loop evaluation needs no VAE and no Inception weights this way. The features
of a latent (C, H, W), taken as the model sees it (already multiplied by ``data.latent_scale``),
are its average pools over a grid of at most :data:`LATENT_POOL_SIDE` × :data:`LATENT_POOL_SIDE`
cells, flattened: 4 × 8 × 8 = 256 values for SD-VAE's 4×32×32 latents (4×4 cells of latents, i.e.
32×32-pixel patches of the decoded image). The pooling keeps the layout and the colour of an
image and drops the fine texture that a few hundred samples could not estimate a covariance of
(F = C·H·W = 4096 values would need more than 4096 samples per side, see
:func:`tread.eval.min_samples_for_fd`).

The number is *not* FID: it says how far the generated latents are from the data's, in a
space no perceptual network shaped. It tracks training progress within one run and compares
runs on the same data and reference; it is not comparable with any published FID.

The module also holds the other config-free checks of a latent run's in-loop evaluation: its
reference (:func:`check_latent_reference`) and the VAE folder of the FID path
(:func:`check_vae_folder`), both cheap enough for ``tread train --dry-run``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tread.data.arrays import ImageArrays
from tread.errors import ConfigError, DataError
from tread.eval.metrics import frechet_distance
from tread.eval.stats import FeatureStats, MomentAccumulator, load_stats, save_stats
from tread.seeding import derive_seed

__all__ = [
    "LATENT_NET_PREFIX",
    "LATENT_POOL_SIDE",
    "LATENT_REFERENCE_CAP",
    "check_latent_reference",
    "check_vae_folder",
    "fd_latent",
    "latent_feature_name",
    "latent_features",
    "latent_reference",
    "latent_reference_stats",
    "latent_stats",
]

LATENT_POOL_SIDE = 8  # cells per side of the pooling grid (fewer for smaller latents)
# The reference: at most this many latents of the data (a fixed random subset), enough for a
# 256-d covariance, and read in bounded memory however large the dataset is.
LATENT_REFERENCE_CAP = 10_000
LATENT_NET_PREFIX = "latent_avgpool"  # feature "net" names: latent_avgpool8x8, ...


def _pool_grid(height: int, width: int, side: int) -> tuple[int, int]:
    # Never more cells than latent positions: pooling 4x4 latents to 8x8 would repeat values
    # and make the covariance singular.
    return min(side, height), min(side, width)


def latent_feature_name(shape: tuple[int, int, int], side: int = LATENT_POOL_SIDE) -> str:
    """The feature name stored with latent statistics, e.g. ``latent_avgpool8x8``.

    Args:
        shape: one latent's (C, H, W).
        side: cells per side of the pooling grid (at most H and W).

    Returns:
        A name that differs whenever the features do (another grid), so stats never mix.
    """
    h, w = _pool_grid(shape[1], shape[2], side)
    return f"{LATENT_NET_PREFIX}{h}x{w}"


def latent_features(latents: Tensor, side: int = LATENT_POOL_SIDE) -> Tensor:
    """Average-pool latents to a grid of at most ``side`` × ``side`` cells and flatten them.

    Args:
        latents: (B, C, H, W) latents as the model sees them (times ``data.latent_scale``).
        side: cells per side of the pooling grid.

    Returns:
        (B, C·h·w) float32 features, h = min(side, H), w = min(side, W).

    Raises:
        DataError: ``latents`` is not 4-D.
    """
    if latents.ndim != 4:
        raise DataError(f"latent FD: expected latents (B, C, H, W), got {tuple(latents.shape)}")
    grid = _pool_grid(latents.shape[2], latents.shape[3], side)
    pooled = F.adaptive_avg_pool2d(latents.float(), grid)  # (B, C, H, W) -> (B, C, h, w)
    return pooled.flatten(1)  # (B, C, h, w) -> (B, C*h*w)


def latent_stats(
    batches: Iterable[Tensor], *, source: str, side: int = LATENT_POOL_SIDE
) -> FeatureStats:
    """Mean and covariance of :func:`latent_features` over batches of latents, streamed.

    Args:
        batches: (B, C, H, W) latent batches, all of one shape per sample.
        source: what the latents are, recorded in the stats (e.g. ``latents:train n=10000``).
        side: cells per side of the pooling grid.

    Returns:
        :class:`FeatureStats` with ``net`` = :func:`latent_feature_name` and no kept features.

    Raises:
        DataError: fewer than 2 latents, or latents of different shapes.
    """
    moments = MomentAccumulator()
    name = ""
    for batch in batches:
        if batch.shape[0] == 0:
            continue
        shape = tuple(int(s) for s in batch.shape[1:])
        batch_name = latent_feature_name(shape, side)  # type: ignore[arg-type]
        if name and batch_name != name:
            raise DataError(f"latent FD: latents of shape {shape} among {name} features")
        name = batch_name
        moments.update(latent_features(batch, side))
    mu, sigma = moments.result()
    return FeatureStats(
        mu=mu,
        sigma=sigma,
        num_samples=moments.count,
        net=name,
        source=source,
        moments_source=f"computed from {source} with {name}",
    )


def latent_reference_stats(
    data: ImageArrays,
    *,
    generator: torch.Generator,
    count: int = LATENT_REFERENCE_CAP,
    batch_size: int = 256,
    source: str = "latents",
    side: int = LATENT_POOL_SIDE,
) -> FeatureStats:
    """Latent statistics of a random subset of a latent dataset, read in bounded memory.

    Only ``min(count, len(data))`` latents are read, ``batch_size`` at a time through
    :meth:`ImageArrays.take` (memory-mapped or streamed data stays on disk), in ascending index
    order so a file is read front to back.

    Args:
        data: the latent dataset (``take`` returns latents times ``data.latent_scale``).
        generator: draws the subset; seed it the same in every run so runs compare.
        count: most latents to use.
        batch_size: latents per read.
        source: description of the subset, recorded in the stats.
        side: cells per side of the pooling grid.

    Returns:
        The :class:`FeatureStats`.

    Raises:
        DataError: ``data`` holds pixels.
    """
    if not data.latent:
        raise DataError(f"latent FD: dataset {data.name} holds images, not latents")
    total = len(data)
    # Sorted: ascending reads for a memory-mapped file; the subset itself is uniform.
    picked = torch.randperm(total, generator=generator)[: min(count, total)].sort().values
    batches = (data.take(chunk)[0] for chunk in picked.split(batch_size))
    return latent_stats(batches, source=source, side=side)


def fd_latent(latents: Tensor, reference: FeatureStats, *, batch_size: int = 256) -> float:
    """Fréchet distance between generated latents and reference latent statistics.

    Args:
        latents: (N, C, H, W) generated latents, as the model outputs them.
        reference: from :func:`latent_reference_stats` (or :func:`latent_stats`).
        batch_size: latents per feature batch (the result does not depend on it).

    Returns:
        The squared Fréchet distance between the two feature Gaussians, >= 0.

    Raises:
        DataError: the reference holds other features (another grid or latent shape).
    """
    stats = latent_stats(latents.split(batch_size), source="generated")
    if stats.net != reference.net:
        raise DataError(
            f"latent FD: reference statistics of {reference.net!r} features cannot score "
            f"{stats.net!r} ones (latents {tuple(latents.shape[1:])})"
        )
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def check_latent_reference(reference: str, key: str = "eval.reference_split") -> None:
    """Check the latent FD's reference without reading data: ``train`` or a latent stats file.

    Args:
        reference: ``train``, or a stats ``.npz`` of latent features (e.g. another run's
            ``RUN_DIR/eval/ref_latents_train_latent.npz`` or :func:`latent_stats` of held-out
            latents saved with :func:`tread.eval.save_stats`).
        key: the setting named in errors.

    Raises:
        ConfigError / DataError: ``test`` (latent datasets have none), a missing file, an ADM
            batch, or statistics of other features.
    """
    from tread.eval.adm import reference_file_kind

    if reference == "train":
        return
    if reference == "test":
        raise ConfigError(
            f"{key}=test: a latent dataset has no test split; use train (the latent FD to a "
            "fixed random subset of the training latents) or a latent stats .npz"
        )
    if not Path(reference).is_file():
        raise ConfigError(f"{key}={reference!r} is neither 'train' nor a file")
    if reference_file_kind(reference) == "adm":
        raise ConfigError(
            f"{key}={reference}: an ADM batch holds images, the latent FD compares latents; "
            "use train, or eval.feature_net=inception for FID"
        )
    net = load_stats(reference).net
    if not net.startswith(LATENT_NET_PREFIX):
        raise ConfigError(
            f"{key}={reference} holds {net or 'unnamed'} statistics, not latent ones "
            f"({LATENT_NET_PREFIX}...); use train, or eval.feature_net=inception for FID"
        )


def latent_reference(
    reference: str,
    load_train: Callable[[], ImageArrays],
    cache_path: str | Path,
    *,
    name: str = "latents",
) -> FeatureStats:
    """The latent FD's reference statistics: a stats file, or the training latents (cached).

    ``train``: a fixed random subset of at most :data:`LATENT_REFERENCE_CAP` training latents,
    drawn with the same seed in every run (so runs on one dataset share their reference and
    compare), read in batches; the statistics go to ``cache_path`` and the data is not read
    again while that file exists.

    Args:
        reference: ``train`` or a latent stats file (see :func:`check_latent_reference`).
        load_train: returns the training latents; called only when no cache exists.
        cache_path: where the statistics of ``train`` are cached.
        name: the dataset's name, recorded as the source.

    Returns:
        The reference :class:`FeatureStats`.
    """
    check_latent_reference(reference)
    if reference != "train":
        return load_stats(reference)
    source = f"{name}:train (random subset, at most {LATENT_REFERENCE_CAP})"
    cache_path = Path(cache_path)
    if cache_path.is_file():
        stats = load_stats(cache_path)
        if stats.source != source:
            raise DataError(f"{cache_path} holds stats of {stats.source!r}, not {source!r}")
        return stats
    generator = torch.Generator().manual_seed(derive_seed("eval", "latent-reference"))
    stats = latent_reference_stats(load_train(), generator=generator, source=source)
    save_stats(stats, cache_path)
    return stats


def check_vae_folder(
    path: str | Path | None, *, channels: int | None = None, origin: str = "eval.vae"
) -> Path:
    """Check a VAE folder without loading it: exists, has a ``config.json``, diffusers is there.

    Args:
        path: a diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``).
        channels: the model's latent channels (``model.in_channels``), checked against the
            VAE's ``latent_channels`` when given.
        origin: where the path came from, named in errors (``eval.vae`` or ``$TREAD_VAE``).

    Returns:
        The folder.

    Raises:
        ConfigError: no path, a missing or malformed folder, no diffusers, other channels.
    """
    if not path:
        raise ConfigError(
            "eval.feature_net=inception on a latent run decodes the samples with a VAE: set "
            "eval.vae (or $TREAD_VAE) to a local diffusers AutoencoderKL folder (sd-vae-ft-ema)"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{origin}: VAE folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        config_file = folder / "vae" / "config.json"  # a whole pipeline folder
    if not config_file.is_file():
        raise ConfigError(f"{origin}: VAE folder {folder} has no config.json (a diffusers model)")
    if importlib.util.find_spec("diffusers") is None:  # found, not imported: dry runs stay fast
        raise ConfigError(
            f"{origin}: decoding needs diffusers, which is not installed; "
            "install it with: pip install 'tread[vae]'"
        )
    try:
        found = json.loads(config_file.read_text()).get("latent_channels")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{origin}: cannot read {config_file}: {err}") from None
    if channels is not None and found is not None and found != channels:
        raise ConfigError(
            f"{origin}: VAE {folder} has {found} latent channels but the model generates "
            f"{channels} (model.in_channels)"
        )
    return folder
