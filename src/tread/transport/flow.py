"""Flow matching on the linear (rectified-flow) path, as in SiT and SD3.

Convention (used by the objective and every flow sampler):
    x_t = (1 - t) * x0 + t * eps,  t = 0 is data, t = 1 is noise,
    velocity target v = dx_t/dt = eps - x0,
and the network receives t in [0, 1] unchanged as its timestep (SiT feeds t straight into the DiT
timestep embedder). Sampling integrates from t = 1 down to t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from tread.errors import ConfigError

from .types import Net, Prediction, bind_generator, expand_to, prediction_channels

TimeSampling = Literal["uniform", "logit_normal"]


@dataclass
class FlowMatching:
    """Linear-path flow-matching objective (velocity MSE).

    ``time_sampling="uniform"`` is SiT's choice; ``"logit_normal"`` (t = sigmoid(N(mean, std)))
    is SD3's and the official TREAD ``rf.py``'s. Training times are clamped to
    [t_eps, 1 - t_eps] so they lie strictly inside (0, 1): the velocity loss itself is fine at the
    end points, but t = 0 or 1 is a degenerate x_t (pure data or pure noise) and an infinite logit.
    """

    name: ClassVar[str] = "flow"

    time_sampling: TimeSampling = "uniform"
    logit_mean: float = 0.0  # mean of logit(t) for "logit_normal"
    logit_std: float = 1.0  # std of logit(t) for "logit_normal"
    t_eps: float = 1e-5  # training times are clamped to [t_eps, 1 - t_eps]

    def __post_init__(self) -> None:
        if self.time_sampling not in get_args(TimeSampling):
            choices = ", ".join(get_args(TimeSampling))
            raise ConfigError(
                f"FlowMatching.time_sampling must be one of {choices}, got {self.time_sampling!r}"
            )
        if not math.isfinite(self.logit_mean):
            raise ConfigError(f"FlowMatching.logit_mean must be finite, got {self.logit_mean!r}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(
                f"FlowMatching.logit_std must be a finite number > 0, got {self.logit_std!r}"
            )
        if not 0.0 <= self.t_eps < 0.5:
            raise ConfigError(f"FlowMatching.t_eps must be in [0, 0.5), got {self.t_eps!r}")

    def sample_time(self, batch: int, *, like: Tensor, generator: torch.Generator) -> Tensor:
        """Draw training times in [t_eps, 1 - t_eps].

        Args:
            batch: number of times B.
            like: tensor whose dtype and device the result takes.
            generator: source of randomness; must live on ``like.device``.

        Returns:
            (B,) times.
        """
        kw = {"generator": generator, "dtype": like.dtype, "device": like.device}
        if self.time_sampling == "uniform":
            t = torch.rand(batch, **kw)
        else:
            t = torch.sigmoid(torch.randn(batch, **kw) * self.logit_std + self.logit_mean)
        return t.clamp(self.t_eps, 1.0 - self.t_eps)

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Return x_t = (1 - t) * x0 + t * noise.

        Args:
            x0: (B, ...) data.
            noise: (B, ...) unit Gaussian noise.
            t: (B,) times.

        Returns:
            (B, ...) points on the path.
        """
        t_b = expand_to(t, x0)
        return (1 - t_b) * x0 + t_b * noise

    def prediction(self, net: Net) -> Prediction:
        """Return what samplers integrate for this objective: the velocity v(x, t, y).

        Args:
            net: raw network ``net(x, t, y)``.

        Returns:
            Prediction callable ``fn(x, time, y)``.
        """
        return self.velocity(net)

    def velocity(self, net: Net) -> Prediction:
        """Return the velocity callable v(x, t, y); for this path it is the network itself.

        A network with a learned variance (2C output channels, DiT's ``learn_sigma``) contributes
        its first C channels as the velocity; the rest is ignored.

        Args:
            net: raw network ``net(x, t, y)`` returning (B, C, ...) or (B, 2C, ...).

        Returns:
            Callable ``v(x, t, y)`` with x (B, C, ...), t (B,), y (B,) -> (B, C, ...).
        """

        def velocity(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return prediction_channels(net(x, t, y), x)  # (B, C, ...)

        return velocity

    def loss_at(self, net: Net, x0: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Velocity MSE at given times and noise (deterministic core of ``loss``).

        Args:
            net: raw network ``net(x, t, y)``.
            x0: (B, ...) clean data.
            y: (B,) labels.
            t: (B,) times.
            noise: (B, ...) unit Gaussian noise.

        Returns:
            (B,) mean over non-batch dims of (v(x_t, t) - (noise - x0))^2.
        """
        x_t = self.interpolate(x0, noise, t)
        err = (self.velocity(net)(x_t, t, y) - (noise - x0)) ** 2
        return err.flatten(1).mean(1)  # (B, ...) -> (B,)

    def loss(self, net: Net, x0: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample flow-matching loss with freshly drawn times and noise.

        Draw order (part of the reproducibility contract): t first, then noise, both from
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
        t = self.sample_time(x0.shape[0], like=x0, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self.loss_at(bind_generator(net, generator), x0, y, t, noise)
