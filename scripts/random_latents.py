"""Write random SD-VAE-shaped latents for smoke runs: ``OUT_DIR/latents.npy`` + ``labels.npy``.

The layout is the one ``data.name=latents`` reads from a directory (``data.path=OUT_DIR``):
``latents.npy`` (N, C, H, W) float16, unscaled like real SD-VAE latents (standard deviation
about 1 / 0.18215, so ``data.latent_scale: 0.18215`` brings them to unit variance), and
``labels.npy`` (N,) int64. The arrays are written chunk by chunk into memory-mapped files, so
memory stays bounded whatever N. Every draw comes from one seeded ``torch.Generator``.

Usage::

    python scripts/random_latents.py /tmp/latents --count 4096 --classes 1000
    tread train imagenet256_dit_xl2_tread data.path=/tmp/latents train.max_minutes=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SD_VAE_STD = 1 / 0.18215  # spread of unscaled SD-VAE latents (the presets' latent_scale)
CHUNK = 1024  # rows drawn and written at a time


def write_random_latents(
    out_dir: Path,
    count: int,
    *,
    classes: int = 1000,
    channels: int = 4,
    size: int = 32,
    seed: int = 0,
    std: float = SD_VAE_STD,
) -> tuple[Path, Path]:
    """Write ``count`` random latents and labels into ``out_dir``.

    Args:
        out_dir: directory to create (or reuse); ``latents.npy`` and ``labels.npy`` go there.
        count: number of samples N.
        classes: labels are drawn uniformly from 0..classes-1.
        channels: latent channels C (SD-VAE: 4).
        size: latent side H = W (ImageNet-256 through SD-VAE: 32).
        seed: seed of the one generator every draw comes from.
        std: standard deviation of the latents.

    Returns:
        The paths of ``latents.npy`` and ``labels.npy``.

    Raises:
        ValueError: a non-positive count, class count, channel count, size or std.
    """
    for name, value in (("count", count), ("classes", classes), ("channels", channels)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if size < 1 or not std > 0:
        raise ValueError(f"size must be >= 1 and std > 0, got size={size}, std={std}")
    out_dir.mkdir(parents=True, exist_ok=True)
    latent_path, label_path = out_dir / "latents.npy", out_dir / "labels.npy"
    shape = (count, channels, size, size)  # (N, C, H, W)
    latents = np.lib.format.open_memmap(latent_path, mode="w+", dtype=np.float16, shape=shape)
    labels = np.lib.format.open_memmap(label_path, mode="w+", dtype=np.int64, shape=(count,))
    g = torch.Generator().manual_seed(seed)
    for start in range(0, count, CHUNK):
        rows = min(CHUNK, count - start)
        draw = torch.randn((rows, channels, size, size), generator=g)  # (n, C, H, W)
        latents[start : start + rows] = (draw * std).to(torch.float16).numpy()
        labels[start : start + rows] = torch.randint(classes, (rows,), generator=g).numpy()
    latents.flush()
    labels.flush()
    return latent_path, label_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory for latents.npy and labels.npy")
    parser.add_argument("--count", type=int, default=4096, help="samples N (default: 4096)")
    parser.add_argument("--classes", type=int, default=1000, help="label range (default: 1000)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (default: 4)")
    parser.add_argument("--size", type=int, default=32, help="latent side (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        paths = write_random_latents(
            args.out_dir,
            args.count,
            classes=args.classes,
            channels=args.channels,
            size=args.size,
            seed=args.seed,
        )
    except (ValueError, OSError) as err:
        print(f"random_latents.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {paths[0]} ({args.count}x{args.channels}x{args.size}x{args.size}) and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
