"""Per-sample random streams, so sample i is the same whatever the batch it is drawn in (EDM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tread.errors import ConfigError


class PerSampleRNG:
    """One ``torch.Generator`` per sample; every draw stacks one independent draw per sample.

    Sample i's noise depends only on ``seeds[i]`` and on how many draws came before, so it is the
    same at any batch size or world size. Generators on the CPU (the default) also make the noise
    the same on every accelerator: draws happen on the CPU and are then moved.

    Args:
        seeds: one integer seed per sample, length B.
        device: where the generators live (and draws happen).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        if len(seeds) == 0:
            raise ConfigError("PerSampleRNG.seeds must be non-empty, got []")
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw one standard normal tensor of ``shape`` per sample.

        Args:
            shape: per-sample shape, e.g. (C, H, W).
            dtype: dtype to draw in.
            device: where the result goes; defaults to the generators' device.

        Returns:
            (B, *shape) tensor.
        """
        draws = [
            torch.randn(tuple(shape), generator=g, dtype=dtype, device=self.device)
            for g in self.generators
        ]
        out = torch.stack(draws)  # B x (*shape) -> (B, *shape)
        return out if device is None else out.to(device)

    def randn_like(self, x: Tensor) -> Tensor:
        """Draw per-sample standard normal noise shaped, typed and placed like ``x``.

        Args:
            x: (B, ...) reference tensor; B must equal the number of seeds.

        Returns:
            (B, ...) noise.
        """
        if x.shape[0] != len(self):
            raise ValueError(
                f"batch of {x.shape[0]} samples but PerSampleRNG has {len(self)} seeds"
            )
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


# What a stochastic sampler accepts: per-sample streams (batch-size invariant) or one plain
# generator (faster for large batches, but sample i then depends on the batch it is in).
NoiseSource = PerSampleRNG | torch.Generator


def randn_like(x: Tensor, rng: NoiseSource) -> Tensor:
    """Draw standard normal noise like ``x`` from either kind of noise source.

    Args:
        x: (B, ...) reference tensor.
        rng: a ``PerSampleRNG`` with B seeds, or a ``torch.Generator`` (draws on its device).

    Returns:
        (B, ...) noise with x's dtype and device.
    """
    if isinstance(rng, PerSampleRNG):
        return rng.randn_like(x)
    return torch.randn(x.shape, generator=rng, dtype=x.dtype, device=rng.device).to(x.device)
