"""Write random SD-VAE-shaped latents for smoke runs: a shard directory, as encode-latents writes.

The layout is the one ``tread encode-latents SRC OUT_DIR`` writes and ``data.name=latents``
streams from memory maps (``data.path=OUT_DIR``, see :mod:`tread.data.shards`): shards of
(n, C, H, W) float16 latents, unscaled like real SD-VAE latents (standard deviation about
1 / 0.18215, so ``data.latent_scale: 0.18215`` brings them to unit variance), with (n,) int64
labels, and ``index.json`` written last. One shard is in memory at a time, so memory stays
bounded whatever N, and a smoke run reads its data the way an ImageNet run does. Every draw
comes from one seeded ``torch.Generator``.

Usage::

    python scripts/random_latents.py /tmp/latents --count 4096 --classes 1000
    tread train imagenet256_dit_xl2_tread data.path=/tmp/latents train.max_minutes=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tread.data.shards import (
    finish_shard_dir,
    num_shards,
    prepare_shard_dir,
    shard_rows,
    write_shard,
)
from tread.errors import TreadError

SD_VAE_STD = 1 / 0.18215  # spread of unscaled SD-VAE latents (the presets' latent_scale)
SHARD_SIZE = 1024  # rows drawn and written at a time, one shard each


def write_random_latents(
    out_dir: Path,
    count: int,
    *,
    classes: int = 1000,
    channels: int = 4,
    size: int = 32,
    seed: int = 0,
    std: float = SD_VAE_STD,
) -> Path:
    """Write ``count`` random latents and labels into the shard directory ``out_dir``.

    Args:
        out_dir: directory to create, or one this function wrote before (replaced).
        count: number of samples N.
        classes: labels are drawn uniformly from 0..classes-1.
        channels: latent channels C (SD-VAE: 4).
        size: latent side H = W (ImageNet-256 through SD-VAE: 32).
        seed: seed of the one generator every draw comes from.
        std: standard deviation of the latents.

    Returns:
        The path of the directory's ``index.json``.

    Raises:
        ValueError: a non-positive count, class count, channel count, size or std.
    """
    for name, value in (("count", count), ("classes", classes), ("channels", channels)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if size < 1 or not std > 0:
        raise ValueError(f"size must be >= 1 and std > 0, got size={size}, std={std}")
    settings = {
        "num_images": count,
        "shard_size": SHARD_SIZE,
        "hflip": False,
        "shape": [channels, size, size],
        "dtype": "float16",
        "num_classes": classes,
        "source": f"random normal, std {std:g}, seed {seed}",
    }
    done = prepare_shard_dir(out_dir, settings, overwrite=True)  # a fresh directory each time
    assert done == 0, "overwrite=True starts over"
    g = torch.Generator().manual_seed(seed)
    for k in range(num_shards(settings)):
        rows = shard_rows(settings, k)
        draw = torch.randn((rows, channels, size, size), generator=g)  # (n, C, H, W)
        labels = torch.randint(classes, (rows,), generator=g)  # (n,)
        write_shard(out_dir, k, (draw * std).to(torch.float16).numpy(), labels.numpy())
    return finish_shard_dir(out_dir, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="shard directory to write")
    parser.add_argument("--count", type=int, default=4096, help="samples N (default: 4096)")
    parser.add_argument("--classes", type=int, default=1000, help="label range (default: 1000)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (default: 4)")
    parser.add_argument("--size", type=int, default=32, help="latent side (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        index = write_random_latents(
            args.out_dir,
            args.count,
            classes=args.classes,
            channels=args.channels,
            size=args.size,
            seed=args.seed,
        )
    except (ValueError, OSError, TreadError) as err:
        print(f"random_latents.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.count}x{args.channels}x{args.size}x{args.size} latents, index {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
