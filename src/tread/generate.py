"""Generate images from a model with per-sample seeds (sample i is the same at any batch size)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import Config
from .sampling import PerSampleRNG, sample
from .seeding import derive_seed
from .train.builders import objective_from_config


def sample_labels(count: int, num_classes: int, labels: Sequence[int] | None = None) -> list[int]:
    """Labels for ``count`` samples: the given list cycled, or 0, 1, ..., K-1, 0, 1, ..."""
    pool = list(labels) if labels else list(range(max(num_classes, 1)))
    return [pool[i % len(pool)] for i in range(count)]


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
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images (b, C, H, W), labels (b,))`` batches; pixels are clamped to [-1, 1].

    Every sample draws its initial noise and any solver noise from its own generator seeded by
    ``derive_seed(seed_i)``, so results do not depend on ``batch_size`` or on how samples are
    split across processes. Unset sampler settings fall back to ``config.sample``.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    settings = config.sample
    sampler = sampler or settings.sampler
    steps = steps or settings.steps
    guidance = settings.guidance if guidance is None else guidance
    interval = guidance_interval if guidance_interval is not None else settings.guidance_interval
    objective = objective_from_config(config)
    shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
    model = model.eval()
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        batch_seeds = [derive_seed("sample", s) for s in seeds[start : start + batch_size]]
        y = torch.tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
        rng = PerSampleRNG(batch_seeds)  # CPU generators: same noise on every device
        noise = rng.randn(shape, device=device)  # (b, C, H, W)
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
        )
        if config.data.name != "latents":  # pixel data lives in [-1, 1]; latents are unbounded
            images = images.clamp(-1, 1)
        yield images, y
