"""``tread sample``: images from the EMA weights of a checkpoint, as a grid, an .npz or files."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

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
        "sample",
        help="sample images from a checkpoint",
        description="Sample from the EMA weights of a checkpoint (or a run's newest checkpoint).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--count", type=positive_int, default=100, help="number of samples")
    p.add_argument("--labels", help="comma-separated class labels, cycled (default: all classes)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (1 = off)")
    p.add_argument("--sampler", default=None, help="edm_heun | flow_euler | flow_heun | ...")
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed+i")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--nrow", type=positive_int, default=None, help="grid columns (PNG output)")
    p.add_argument("--out", default="samples.png", help="a .png grid, an .npz, or a directory")
    add_vae_option(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..data.vae import latent_decoder
    from ..generate import generate, sample_labels
    from ..train import load_for_inference
    from ..visual import save_grid, to_uint8

    device = resolve_device(args.device)
    model, config, step = load_for_inference(args.checkpoint, device)
    labels = sample_labels(args.count, config.model.num_classes, _parse_labels(args.labels))
    bad = [v for v in labels if not 0 <= v <= config.model.num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad[0]} is outside 0..{config.model.num_classes}")
    # Latent models: load the VAE before sampling so a bad --vae fails at once.
    decode = latent_decoder(config, vae_path(args), device)
    seeds = [args.seed + i for i in range(args.count)]
    batches = generate(
        model,
        config,
        labels,
        seeds,
        batch_size=args.batch_size,
        device=device,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        progress=True,
    )
    images = torch.cat([(decode(x) if decode else x).cpu() for x, _ in batches])
    out = Path(args.out)
    if out.suffix == ".png":
        scale = max(1, 96 // images.shape[-1])
        save_grid(images, out, nrow=args.nrow, scale=scale)
    elif out.suffix == ".npz":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, arr_0=to_uint8(images), labels=np.array(labels))
    else:
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for index, (pixels, label) in enumerate(zip(to_uint8(images), labels, strict=True)):
            array = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
            Image.fromarray(array).save(out / f"{index:06d}_class{label}.png")
    print(f"wrote {len(labels)} samples from step {step} to {out}")
    return 0
