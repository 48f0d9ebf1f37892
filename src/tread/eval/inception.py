"""Inception-v3 as used for FID (the TF "2015-12-05" graph as ported by pytorch-fid).

Written from the architecture description (Szegedy et al. 2016, "Rethinking the Inception
Architecture", figs. 5-7) with the FID-specific quirks of the TF graph:

* the pooling branch of the 35×35, 17×17 and first 8×8 blocks averages without counting the
  zero padding (``count_include_pad=False``);
* the pooling branch of the last 8×8 block uses *max* pooling;
* 1008 output classes; BatchNorm eps = 1e-3; no auxiliary classifier.

Module and parameter names follow pytorch-fid / torchvision (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch_pool.bn.running_mean``, ``fc.weight`` ...) so the user's local
``pt_inception-2015-12-05-6726825d.pth`` loads with ``strict=True``. Nothing is downloaded.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tread.errors import DataError
from tread.eval.features import FeatureOutput

WEIGHTS_ENV_VAR = "TREAD_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"

# ADM's evaluator takes sFID features from the TF tensor "mixed_6/conv:0", keeping its first 7
# channels. TF names the eleven mixed blocks mixed, mixed_1 ... mixed_10, so mixed_6 is the 7th
# block = Mixed_6d here, and ".../conv" is its 1×1 branch (output after BN + ReLU): 17×17×192.
SPATIAL_BLOCK = "Mixed_6d"
SPATIAL_CHANNELS = 7

PoolKind = Literal["avg", "max"]


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: torch.Tensor, kind: PoolKind) -> torch.Tensor:
    """3×3 stride-1 'same' pool-branch pooling; avg skips the padding, as the TF graph does."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | pool→1×1. Out: 224 + pool_features channels."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | maxpool/2. Out: 480 + in_ch channels."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convs (1×7 and 7×1). Out: 768 channels."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7d = conv(b7d)
        b7d = self.branch7x7dbl_5(b7d)
        bp = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """17→8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | maxpool/2. Out: 512 + in_ch channels."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs. Out: 2048 channels.

    Args:
        in_ch: input channels.
        pool: pooling of the pool branch; the TF graph's last block (Mixed_7c) uses "max".
    """

    def __init__(self, in_ch: int, pool: PoolKind) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        bp = self.branch_pool(_pool_3x3(x, self.pool))
        return torch.cat([b1, b3, b3d, bp], dim=1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3; implements :class:`~tread.eval.features.FeatureNet`.

    Build it untrained here; get the real weights with :func:`load_inception`.
    """

    name = "inception_v3_fid"
    input_size = (3, 299, 299)

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> FeatureOutput:
        """Extract FID features.

        Args:
            images: (B, 3, H, W) in [-1, 1] (pytorch-fid's scaling after its 2x-1 step);
                (B, 1, H, W) grey images are repeated to 3 channels. Resized bilinearly
                (align_corners=False) to 299×299 as pytorch-fid does.

        Returns:
            pool (B, 2048) pool3 features, logits (B, 1008), spatial (B, 17·17·7 = 2023) in
            (H, W, C) order to match ADM's ``mu_s``/``sigma_s``.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape)
            raise DataError(f"{self.name}: images must be (B, 1|3, H, W), got {shape}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        # Recomputing the 1×1 branch here is cheap (768→192 at 17×17) and keeps the blocks free
        # of feature-tapping logic.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (B, 17, 17, 7) -> (B, 2023)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        return FeatureOutput(pool=pool, logits=self.fc(pool), spatial=spatial)


def inception_weights_from_env() -> Path | None:
    """Path given by the ``TREAD_INCEPTION_WEIGHTS`` environment variable, if set.

    Only the CLI calls this; library code takes the path as an argument.
    """
    value = os.environ.get(WEIGHTS_ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def load_inception(
    weights_path: str | PathLike[str] | None, device: str | torch.device = "cpu"
) -> InceptionV3FID:
    """Load the FID Inception-v3 from a local pytorch-fid weights file, in eval mode.

    Args:
        weights_path: ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict; a
            ``.safetensors`` file with the same keys also works).
        device: where to put the model.

    Returns:
        The network with frozen weights.
    """
    hint = (
        f"download {WEIGHTS_FILENAME} from the pytorch-fid GitHub release 'fid_weights' yourself "
        f"and pass its path or set {WEIGHTS_ENV_VAR}"
    )
    if weights_path is None:
        raise DataError(f"no Inception weights given; {hint}")
    path = Path(weights_path)
    if not path.is_file():
        raise DataError(f"Inception weights not found: {path}; {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: the file is a plain tensor dict; never unpickle arbitrary objects.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/pickle raise many types for a corrupt or foreign file
        raise DataError(f"{path}: unreadable Inception weights ({type(err).__name__})") from err
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict, got {type(state).__name__}")
    model = InceptionV3FID()
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise DataError(
            f"{path}: not pytorch-fid Inception weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: tensor shapes do not match the FID Inception-v3") from err
    model.eval().requires_grad_(False)
    return model.to(device)


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """Missing and unexpected keys; old files may lack BatchNorm's num_batches_tracked, which
    BatchNorm fills in itself when loading, so it is not counted as missing."""
    expected = set(model.state_dict())
    given = set(state)
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    return missing, sorted(given - expected)
