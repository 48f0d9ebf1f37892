"""EDM denoising objective with Karras preconditioning (Karras et al. 2022, Table 1 / Sec. 5)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tread.errors import ConfigError

from .types import Net, Prediction, bind_generator, expand_to, prediction_channels


@dataclass
class EDM:
    """EDM training objective: ln(sigma) ~ N(p_mean, p_std^2), preconditioned denoiser D.

    D(x; sigma, y) = c_skip * x + c_out * F(c_in * x, c_noise, y), where F is the raw network and
    c_noise = ln(sigma) / 4 is what the network receives as its ``t``. The loss weight
    lambda = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 equals 1 / c_out^2, so the
    network's own output F is regressed with unit weight at every noise level (EDM Sec. 5).
    """

    name: ClassVar[str] = "edm"

    p_mean: float = -1.2  # mean of ln(sigma) at training time
    p_std: float = 1.2  # std of ln(sigma) at training time
    sigma_data: float = 0.5  # std of the data (SD-VAE latents scaled by 0.18215 are close to 0.5)

    def __post_init__(self) -> None:
        if not math.isfinite(self.p_mean):
            raise ConfigError(f"EDM.p_mean must be finite, got {self.p_mean!r}")
        if not (math.isfinite(self.p_std) and self.p_std > 0):
            raise ConfigError(f"EDM.p_std must be a finite number > 0, got {self.p_std!r}")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ConfigError(
                f"EDM.sigma_data must be a finite number > 0, got {self.sigma_data!r}"
            )

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return the preconditioning coefficients at noise level ``sigma`` (EDM Table 1).

        Args:
            sigma: (B,) noise levels, > 0.

        Returns:
            ``(c_skip, c_out, c_in, c_noise)``, each (B,) like ``sigma``.
        """
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = total.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Return lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.

        Args:
            sigma: (B,) noise levels.

        Returns:
            (B,) loss weights.
        """
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_time(self, batch: int, *, like: Tensor, generator: torch.Generator) -> Tensor:
        """Draw training noise levels with ln(sigma) ~ N(p_mean, p_std^2).

        Args:
            batch: number of levels B.
            like: tensor whose dtype and device the result takes.
            generator: source of randomness; must live on ``like.device``.

        Returns:
            (B,) noise levels.
        """
        z = torch.randn(batch, generator=generator, dtype=like.dtype, device=like.device)
        return (z * self.p_std + self.p_mean).exp()

    def prediction(self, net: Net) -> Prediction:
        """Return what samplers integrate for this objective: the denoiser D(x, sigma, y).

        Args:
            net: raw network ``net(x, t, y)``.

        Returns:
            Prediction callable ``fn(x, time, y)``.
        """
        return self.denoiser(net)

    def denoiser(self, net: Net) -> Prediction:
        """Wrap the raw network F into the preconditioned denoiser D(x, sigma, y).

        A network with a learned variance (2C output channels, DiT's ``learn_sigma``) contributes
        its first C channels as F; the variance channels are not trained by this objective.

        Args:
            net: raw network ``net(x, t, y)`` returning (B, C, ...) or (B, 2C, ...).

        Returns:
            Callable ``D(x, sigma, y)`` with x (B, C, ...), sigma (B,), y (B,) -> (B, C, ...)
            estimate of the clean data.
        """

        def denoise(x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
            c_skip, c_out, c_in, c_noise = self.precondition(sigma)
            out = prediction_channels(net(expand_to(c_in, x) * x, c_noise, y), x)  # (B, C, ...)
            return expand_to(c_skip, x) * x + expand_to(c_out, x) * out

        return denoise

    def loss_at(self, net: Net, x0: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """Weighted denoising loss at given noise levels and noise (deterministic core of loss).

        Args:
            net: raw network ``net(x, t, y)``.
            x0: (B, ...) clean data.
            y: (B,) labels.
            sigma: (B,) noise levels.
            noise: (B, ...) unit Gaussian noise, same shape as x0.

        Returns:
            (B,) lambda(sigma) * mean over non-batch dims of (D(x0 + sigma n) - x0)^2.
        """
        x_noisy = x0 + expand_to(sigma, x0) * noise
        err = (self.denoiser(net)(x_noisy, sigma, y) - x0) ** 2
        return self.loss_weight(sigma) * err.flatten(1).mean(1)  # (B, ...) -> (B,)

    def loss(self, net: Net, x0: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample EDM training loss with freshly drawn sigma and noise.

        Draw order (part of the reproducibility contract): sigma first, then noise, both from
        ``generator``; then, if ``net`` takes a ``generator`` keyword (tread backbones do), the
        same generator is passed to it, so its routing subsets are drawn next (one per active
        route, in route order) and nothing comes from the global RNG.

        Args:
            net: raw network ``net(x, t, y)``, optionally with a ``generator`` keyword.
            x0: (B, ...) clean data.
            y: (B,) labels.
            generator: source of randomness; must live on ``x0.device``.

        Returns:
            (B,) per-sample losses; the caller reduces them.
        """
        sigma = self.sample_time(x0.shape[0], like=x0, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self.loss_at(bind_generator(net, generator), x0, y, sigma, noise)
