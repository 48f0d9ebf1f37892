"""Route plans: the kept-token indices of one route for one forward pass, and gather/scatter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutePlan:
    """Indices of the tokens that run through a route; the rest skip it unchanged.

    Attributes:
        keep: (B, K) long indices into the token axis, one row per sample.
    """

    keep: Tensor

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    def _index(self, x: Tensor) -> Tensor:
        # (B, K) -> (B, K, *x.shape[2:]) so that torch.gather/scatter work on any trailing dims.
        index = self.keep.view(*self.keep.shape, *([1] * (x.dim() - 2)))
        return index.expand(-1, -1, *x.shape[2:])

    def gather(self, x: Tensor) -> Tensor:
        """Select the kept tokens.

        Args:
            x: (B, N, ...) token-aligned tensor (activations, positions, RoPE angles, masks).

        Returns:
            (B, K, ...) the kept tokens, in the order of ``keep``.
        """
        if x.dim() < 2 or x.shape[0] != self.keep.shape[0]:
            raise ValueError(
                f"cannot route a tensor of shape {tuple(x.shape)}: token-aligned tensors must be "
                f"(B, N, ...) with B = {self.keep.shape[0]}"
            )
        return torch.gather(x, 1, self._index(x))  # (B, N, ...) -> (B, K, ...)

    def scatter(self, kept: Tensor, saved: Tensor) -> Tensor:
        """Put processed tokens back over the sequence saved at the route start (out of place).

        Skipped positions keep their route-start values exactly, so they re-enter unchanged;
        gradients flow to both ``kept`` and the skipped positions of ``saved``.

        Args:
            kept: (B, K, ...) tokens that ran through the span.
            saved: (B, N, ...) the full sequence as it entered the span.

        Returns:
            (B, N, ...) with kept positions replaced, dtype of ``saved`` promoted with ``kept``.
        """
        if kept.dtype != saved.dtype:
            # Autocast can hand back a different dtype than entered; keep the wider one.
            dtype = torch.promote_types(kept.dtype, saved.dtype)
            kept, saved = kept.to(dtype), saved.to(dtype)
        return saved.scatter(1, self._index(kept), kept)  # (B, K, ...) into (B, N, ...)


def sample_plan(
    batch: int,
    num_tokens: int,
    num_kept: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    keep_order: bool = False,
    force_keep: Tensor | None = None,
) -> RoutePlan:
    """Draw a fresh uniform random subset of ``num_kept`` tokens per sample.

    Args:
        batch: B.
        num_tokens: N.
        num_kept: K, 1 <= K <= N.
        generator: source of randomness; the draw happens on the generator's device and the
            indices are moved to ``device``, so a CPU generator can drive a CUDA model.
        device: device of the returned indices.
        keep_order: sort the kept indices so the tokens keep their original (raster) order;
            attention does not care, scan-based backbones (SSMs) do.
        force_keep: optional (B, N) bool mask of tokens that never skip (e.g. under a loss
            mask). They are kept first and the rest of the subset is drawn uniformly from the
            other tokens. The batch shares one K: if a sample forces more than ``num_kept``
            tokens, every sample keeps that many.

    Returns:
        RoutePlan with keep of shape (B, K), K = max(num_kept, most tokens forced in a sample).
    """
    if not 1 <= num_kept <= num_tokens:
        raise ValueError(f"num_kept must be in [1, {num_tokens}], got {num_kept}")
    draw_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_tokens, generator=generator, device=draw_device)  # (B, N)
    if force_keep is not None:
        if force_keep.dtype != torch.bool or tuple(force_keep.shape) != (batch, num_tokens):
            raise ValueError(
                f"force_keep must be a (B, N) = ({batch}, {num_tokens}) bool mask, got "
                f"{force_keep.dtype} of shape {tuple(force_keep.shape)}"
            )
        forced = force_keep.to(noise.device)
        num_kept = max(num_kept, int(forced.sum(dim=1).max()))
        # noise is in [0, 1): forced tokens move to [-1, 0) and sort before every other token.
        noise = noise - forced.to(noise.dtype)
    # Any K of a uniform random permutation is a uniform random K-subset.
    keep = noise.argsort(dim=1)[:, :num_kept]  # (B, N) -> (B, K)
    if keep_order:
        keep = keep.sort(dim=1).values
    return RoutePlan(keep.to(device) if device is not None else keep)
