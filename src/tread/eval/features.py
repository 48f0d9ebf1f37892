"""The feature-network protocol shared by the packaged classifiers and Inception-v3."""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

import torch

from tread.errors import DataError


class FeatureOutput(TypedDict):
    """What a feature network returns for a batch of B images.

    pool: (B, F) pooled features (FD/FID, KID, precision/recall).
    logits: (B, K) class logits (IS, conditional accuracy), or None.
    spatial: (B, F2) flattened spatial features (sFID), or None.
    """

    pool: torch.Tensor
    logits: torch.Tensor | None
    spatial: torch.Tensor | None


@runtime_checkable
class FeatureNet(Protocol):
    """A frozen network mapping images in [-1, 1] to features.

    Attributes:
        name: identifier stored with reference statistics so stats from different nets never mix.
        input_size: (C, H, W) the network was trained on; other sizes are handled by the net
            (centre crop for the classifiers, bilinear resize for Inception) or rejected.
    """

    name: str
    input_size: tuple[int, int, int]

    def forward(self, images: torch.Tensor) -> FeatureOutput:
        """Args: images (B, C, H, W) float in [-1, 1]. Returns: a :class:`FeatureOutput`."""
        ...

    def __call__(self, images: torch.Tensor) -> FeatureOutput: ...


def center_crop_to(images: torch.Tensor, size: tuple[int, int], net_name: str) -> torch.Tensor:
    """Centre-crop images to `size` (e.g. a 32×32 padded Fashion-MNIST sample to 28×28).

    Args:
        images: (B, C, H, W) with H >= size[0], W >= size[1] and even margins.
        size: target (H', W').
        net_name: used in the error message.

    Returns:
        (B, C, H', W') view of `images`.
    """
    if images.ndim != 4:
        raise DataError(f"{net_name}: images must be (B, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return images
    dh, dw = h - th, w - tw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise DataError(
            f"{net_name}: cannot centre-crop {h}x{w} images to {th}x{tw} (expects {th}x{tw} "
            "or a larger size with even margins)"
        )
    return images[..., dh // 2 : dh // 2 + th, dw // 2 : dw // 2 + tw]


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels of a uint8 image and map them back to [-1, 1].

    Generated samples are scored as the images a user would save: the ADM suite, pytorch-fid
    and torch-fidelity all read uint8 files, and DiT's ``sample_ddp.py`` writes
    ``clamp(127.5 x + 128, 0, 255)`` truncated, i.e. round-to-nearest of ``127.5 (x + 1)``, as
    here. Skipping it changes FID measurably (the feature nets see sub-level noise), so both
    sides of every comparison go through this. Idempotent, and exact on uint8 inputs converted
    as ``u / 127.5 - 1`` (:func:`tread.eval.adm.uint8_nhwc_to_float`).

    Args:
        images: (B, C, H, W) float images in [-1, 1] (values outside are clamped).

    Returns:
        float32 images of the same shape on the uint8 grid, in [-1, 1].
    """
    levels = torch.floor((images.float() + 1.0) * 127.5 + 0.5).clamp_(0.0, 255.0)
    return levels / 127.5 - 1.0
