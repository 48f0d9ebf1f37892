"""Types and helpers shared by the objectives and the samplers: the network contract."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

# The network contract: ``net(x, t, y) -> out`` with x (B, C, H, W), t (B,) float, y (B,) long.
# ``y == num_classes`` is the null label used by classifier-free guidance.
#
# ``out`` is (B, C, ...) like x, or (B, 2C, ...) for a network with a learned variance (DiT's
# ``learn_sigma``, as in its published checkpoints): the objectives then use the first C channels
# as the prediction and ignore the rest (see :func:`prediction_channels`).
#
# A network may also take a keyword ``generator`` (tread backbones do: it draws the routing
# subsets). ``EDM.loss`` / ``FlowMatching.loss`` then pass their own generator on, after drawing
# the time and the noise from it, so a user's loop has no hidden draw from the global RNG (see
# :func:`bind_generator`). Plain three-argument callables keep working unchanged.
Net = Callable[[Tensor, Tensor, Tensor], Tensor]

# What an objective hands to a sampler: ``fn(x, time, y) -> prediction``, same shape as x. For
# EDM ``time`` is sigma and the prediction is the denoised x0; for flow matching ``time`` is t in
# [0, 1] and the prediction is the velocity.
Prediction = Callable[[Tensor, Tensor, Tensor], Tensor]

ObjectiveName = Literal["edm", "flow"]


def expand_to(per_sample: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tensor so it broadcasts against ``like``.

    Args:
        per_sample: (B,) values, one per sample.
        like: (B, ...) tensor to broadcast against.

    Returns:
        (B, 1, ..., 1) view with ``like.ndim`` dimensions.
    """
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, 1, 1)


def prediction_channels(out: Tensor, x: Tensor) -> Tensor:
    """The network's prediction: ``out`` itself, or its first C channels for a learned variance.

    DiT with ``learn_sigma`` returns 2C channels, the prediction first and the variance
    (interpolation weights) second (DiT Sec. 3.1); the objectives here train and sample the
    prediction only. Any other shape is refused instead of silently broadcasting against x.

    Args:
        out: (B, C, ...) or (B, 2C, ...) raw network output.
        x: (B, C, ...) network input.

    Returns:
        (B, C, ...) prediction, a view of ``out``.

    Raises:
        ValueError: ``out`` is neither x's shape nor x's shape with twice the channels.
    """
    if out.shape == x.shape:
        return out
    channels = x.shape[1] if x.dim() > 1 else 0
    learned_variance = (
        out.dim() == x.dim() > 1
        and out.shape[0] == x.shape[0]
        and out.shape[1] == 2 * channels
        and out.shape[2:] == x.shape[2:]
    )
    if not learned_variance:
        raise ValueError(
            f"network output has shape {tuple(out.shape)} for an input of shape "
            f"{tuple(x.shape)}: expected the input's shape, or twice its channels (learn_sigma)"
        )
    return out[:, :channels]  # (B, 2C, ...) -> (B, C, ...)


def _signature_owner(net: Any) -> Any:
    """The function whose signature decides what ``net`` accepts (wrappers unwrapped)."""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module  # forwards its keyword arguments to the wrapped module
        elif isinstance(net, nn.Module) and isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    if isinstance(net, nn.Module):
        return type(net).forward
    return getattr(net, "__func__", net)  # bound method -> its function


def accepts_generator(net: Callable[..., Any]) -> bool:
    """Whether ``net`` takes a keyword argument named ``generator``.

    Modules are judged by their ``forward`` (through DDP, DataParallel and ``torch.compile``
    wrappers); a ``functools.partial`` that already binds ``generator`` counts as not taking it.
    ``**kwargs`` alone does not count: only an explicitly named parameter is trusted.

    Args:
        net: the network callable.

    Returns:
        True when ``net(x, t, y, generator=g)`` is a valid call.
    """
    if isinstance(net, functools.partial):
        return "generator" not in net.keywords and accepts_generator(net.func)
    try:  # read once per loss call: microseconds next to a forward pass
        parameter = inspect.signature(_signature_owner(net)).parameters.get("generator")
    except (TypeError, ValueError):  # builtins and other callables without a signature
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameter is not None and parameter.kind in keyword


def bind_generator(net: Net, generator: torch.Generator) -> Net:
    """Return ``net`` with ``generator=generator`` bound when it takes that keyword, else ``net``.

    Args:
        net: the network callable.
        generator: the objective's generator, passed on to the network's own draws (routing).

    Returns:
        A callable ``fn(x, t, y)``.
    """
    if accepts_generator(net):
        return functools.partial(net, generator=generator)
    return net
