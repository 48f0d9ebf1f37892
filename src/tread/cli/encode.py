"""``tread encode-latents``: images -> SD-VAE posterior-mean latents for latent training."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import (
    HelpFormatter,
    add_runtime_options,
    add_vae_option,
    positive_int,
    resolve_device,
    vae_path,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode-latents",
        help="encode images to VAE latents (a shard directory or .npz) for latent training",
        description="Encode an image folder (one sub-directory per class) or an .npz of images "
        "to posterior-mean latents with a local SD-VAE, for data.name=latents. OUT is a shard "
        "directory (latents_*.npy + labels_*.npy per --shard-size images, index.json written "
        "last; training streams it from memory maps) unless it ends in .npz (one file built "
        "in memory: small sets). Rerunning an interrupted encode with the same options resumes "
        "it after its complete shards. Example: tread encode-latents /data/imagenet/train "
        "data/imagenet256_latents --vae /models/sd-vae-ft-ema",
        formatter_class=HelpFormatter,
    )
    p.add_argument("src", help="image folder (class sub-directories) or .npz of uint8 images")
    p.add_argument("out", help="output directory (sharded), or an .npz file")
    add_vae_option(p, "encode with")
    p.add_argument("--resolution", type=positive_int, default=256, help="resize + crop side")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call")
    p.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="stored latents"
    )
    p.add_argument("--hflip", action="store_true", help="also store latents of mirrored images")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="images per shard (directory OUT; default 50000: 410 MB of 4x32x32 float16)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete OUT")
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.vae import encode_dataset

    vae = vae_path(args)
    if not vae:
        raise ConfigError("--vae PATH is required (a local diffusers AutoencoderKL folder)")
    device = resolve_device(args.device)
    result = encode_dataset(
        args.src,
        args.out,
        vae,
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=device,
        dtype=args.dtype,
        hflip=args.hflip,
        overwrite=args.overwrite,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=True,
    )
    c, h, w = result.latent_shape
    kept = (
        f", {result.resumed_shards} kept from an interrupted run" if result.resumed_shards else ""
    )
    shards = "" if args.out.lower().endswith(".npz") else f" in {result.num_shards} shards{kept}"
    print(
        f"wrote {result.num_latents} latents ({c}x{h}x{w} {args.dtype}, "
        f"{result.num_classes} classes) to {result.path}{shards}"
    )
    return 0
