"""Generate images from a model with per-sample seeds (sample i is the same at any batch size),
and write them as a PNG grid, an ``.npz`` or a folder of PNGs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .config import Config
from .errors import ConfigError
from .paths import check_creatable
from .sampling import CostMeter, PerSampleRNG, sample
from .seeding import derive_seed
from .train.builders import objective_from_config

OutputKind = Literal["grid", "npz", "dir"]
# Output suffix -> kind; no suffix means a directory of PNG files.
OUTPUT_SUFFIXES: dict[str, OutputKind] = {".png": "grid", ".npz": "npz", "": "dir"}
# Grids get one column per class up to this many classes; beyond it they are square.
MAX_CLASS_COLUMNS = 32


def sample_labels(count: int, num_classes: int, labels: Sequence[int] | None = None) -> list[int]:
    """Labels for ``count`` samples: the given list cycled, or 0, 1, ..., K-1, 0, 1, ..."""
    pool = list(labels) if labels else list(range(max(num_classes, 1)))
    return [pool[i % len(pool)] for i in range(count)]


def grid_columns(count: int, pool_size: int) -> int | None:
    """Default grid columns: one per cycled label (so each column is one class), else None
    (a square grid) for a single label or more than :data:`MAX_CLASS_COLUMNS` labels."""
    if 1 < pool_size <= MAX_CLASS_COLUMNS:
        return min(count, pool_size)
    return None


def latent_decoder_for(
    config: Config, vae_path: str | Path | None, device: torch.device | str = "cpu"
) -> Callable[[Tensor], Tensor] | None:
    """:func:`tread.data.vae.latent_decoder` with the values a run's config gives it."""
    from .data.vae import latent_decoder

    return latent_decoder(
        vae_path,
        latent=config.data.name == "latents",
        scale=config.data.latent_scale,
        channels=config.model.in_channels,
        device=device,
    )


def with_guidance(config: Config, **settings: Any) -> Config:
    """``config`` with guidance settings of ``sample:`` replaced, checked as the config is.

    Values left None keep the config's (so CLI flags that were not given change nothing);
    ``guidance_interval=[]`` removes an interval. Every check of the ``sample:`` section and
    of the config as a whole runs again, so a bad combination is the same one-line
    ``ConfigError`` whether it came from a YAML file or from flags.

    Args:
        config: the run's config.
        **settings: ``SampleConfig`` fields (guidance, guidance_mode, guidance_interval,
            sg_strong_ratio, sg_weak_ratio, sg_route, sampler, steps).

    Returns:
        The updated config.

    Raises:
        ConfigError: an unknown field or a value the config refuses.
    """
    known = {f.name for f in dataclasses.fields(config.sample)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown sample setting {unknown[0]!r}")
    changes = {key: value for key, value in settings.items() if value is not None}
    if changes.get("guidance_interval") == []:
        changes["guidance_interval"] = None
    if not changes:
        return config
    return dataclasses.replace(config, sample=dataclasses.replace(config.sample, **changes))


def cost_meter(model: nn.Module) -> CostMeter:
    """A cost meter for ``model``: NFE always, FLOPs when the analytic cost model prices it.

    Args:
        model: the network sampled from.

    Returns:
        A fresh :class:`tread.sampling.CostMeter`.
    """
    from .cost import forward_flops

    try:
        forward_flops(model)
    except ValueError:  # not a tread DiT: evaluations are counted, FLOPs are not
        return CostMeter()
    return CostMeter(lambda routes: forward_flops(model, routes))


def describe_guidance(config: Config) -> str:
    """The guidance of ``config.sample`` in a few words, e.g. ``sg 1.5 (0→0.5 on 2..5)``."""
    settings = config.sample
    text = f"{settings.guidance_mode} {settings.guidance:g}"
    sparse = config.sparse_guidance()
    if sparse is not None:
        spans = ", ".join(f"{a}..{b}" for a, b in sparse.spans)
        text += f" ({sparse.strong_ratio:g}→{sparse.weak_ratio:g} on {spans})"
    if settings.guidance_interval:
        lo, hi = settings.guidance_interval
        text += f" in [{lo:g}, {hi:g}]"
    return text


def describe_cost(per_image: dict[str, float | None]) -> str:
    """``NFE/image 34, GFLOPs/image 0.0123`` from :meth:`CostMeter.per_image`."""
    nfe, flops = per_image.get("nfe_per_image"), per_image.get("flops_per_image")
    text = "NFE/image n/a" if nfe is None else f"NFE/image {nfe:g}"
    return text + ("" if flops is None else f", GFLOPs/image {flops / 1e9:.4g}")


@torch.no_grad()
def generate(
    model: nn.Module,
    config: Config,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_interval: Sequence[float] | None = None,
    meter: CostMeter | None = None,
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images (b, C, H, W), labels (b,))`` batches; pixels are clamped to [-1, 1].

    Every sample draws its initial noise and any solver noise from its own generator seeded by
    ``derive_seed("sample", seed_i)``, and the kept tokens of sparse-guidance branches from a
    second one (``derive_seed("sample-route", seed_i)``), so results do not depend on
    ``batch_size`` or on how samples are split across processes, and a sample starts from the
    same noise in every guidance mode. Unset sampler settings fall back to ``config.sample``,
    which also gives the guidance mode and the sparse branches (see :func:`with_guidance`).

    Args:
        model: the network (put in eval mode here).
        config: the run's config.
        labels: one class label per sample (``num_classes`` = unconditional).
        seeds: one seed per sample.
        batch_size: samples per sampler call.
        device: where the model runs.
        sampler, steps, guidance, guidance_interval: overrides of ``config.sample``.
        meter: cost meter (see :func:`cost_meter`) that counts this generation's NFE / FLOPs.
        progress: show a progress bar.

    Returns:
        An iterator of batches.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    settings = config.sample
    sampler = sampler or settings.sampler
    steps = steps or settings.steps
    guidance = settings.guidance if guidance is None else guidance
    interval = guidance_interval if guidance_interval is not None else settings.guidance_interval
    sparse = config.sparse_guidance()  # None in mode "cfg"
    objective = objective_from_config(config)
    shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
    model = model.eval()
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        batch = seeds[start : start + batch_size]
        y = torch.tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
        rng = PerSampleRNG([derive_seed("sample", s) for s in batch])  # CPU: same on any device
        noise = rng.randn(shape, device=device)  # (b, C, H, W)
        # A separate stream for routing keeps the solver's draws what they are without SG.
        routing = PerSampleRNG([derive_seed("sample-route", s) for s in batch]) if sparse else None
        images = sample(
            objective,
            model,
            noise,
            y,
            sampler=sampler,
            steps=steps,
            rng=rng,
            guidance=guidance,
            null_label=config.model.num_classes,
            guidance_interval=tuple(interval) if interval else None,
            guidance_mode=settings.guidance_mode,
            sparse=sparse,
            route_rng=routing,
            meter=meter,
        )
        if config.data.name != "latents":  # pixel data lives in [-1, 1]; latents are unbounded
            images = images.clamp(-1, 1)
        yield images, y


def check_sample_output(out: str | Path, *, overwrite: bool = False) -> OutputKind:
    """Refuse an output path before any sampling, and say what will be written there.

    Args:
        out: ``*.png`` (a grid), ``*.npz`` (uint8 ``arr_0`` + ``labels``) or a path without a
            suffix (a new or empty directory of PNG files).
        overwrite: replace an existing ``.png`` / ``.npz`` file.

    Returns:
        "grid", "npz" or "dir".

    Raises:
        ConfigError: an unknown suffix, an existing file without ``overwrite``, a non-empty
            directory, or a place that cannot be written.
    """
    out = Path(os.path.normpath(out))  # "missing/../file/x.png" is judged as "file/x.png"
    kind = OUTPUT_SUFFIXES.get(out.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"output {out}: unknown suffix {out.suffix!r}; write a .png grid, an .npz, or a "
            "directory (a path without a suffix)"
        )
    if kind == "dir":
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"output directory {out} is not empty; choose a new or empty one")
        check_creatable(out, f"output {out}")
        return kind
    if out.is_dir():
        raise ConfigError(f"output {out} is a directory, not a {out.suffix} file")
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    check_creatable(out.parent, f"output {out}")
    return kind


def save_samples(
    images: Tensor, labels: Sequence[int], out: str | Path, *, nrow: int | None = None
) -> Path:
    """Write samples where :func:`check_sample_output` allowed.

    Args:
        images: (N, C, H, W) in [-1, 1] on CPU.
        labels: the N labels (saved in the ``.npz`` and in PNG file names).
        out: the output path (kind from its suffix).
        nrow: grid columns (PNG grid only; None = square).

    Returns:
        ``out``.
    """
    import numpy as np

    from .visual import save_grid, to_uint8

    out = Path(out)
    kind = OUTPUT_SUFFIXES[out.suffix.lower()]
    try:
        if kind == "grid":
            scale = max(1, 96 // images.shape[-1])  # tiny images are enlarged to be visible
            save_grid(images, out, nrow=nrow, scale=scale)
        elif kind == "npz":
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, arr_0=to_uint8(images), labels=np.array(labels))
        else:
            from PIL import Image

            out.mkdir(parents=True, exist_ok=True)
            for index, (pixels, label) in enumerate(zip(to_uint8(images), labels, strict=True)):
                array = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
                Image.fromarray(array).save(out / f"{index:06d}_class{label}.png")
    except OSError as err:
        raise ConfigError(f"output {out}: cannot write ({err.strerror or err})") from None
    return out
