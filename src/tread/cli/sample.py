"""``tread sample``: images from the EMA weights of a checkpoint, as a grid, an .npz or files."""

from __future__ import annotations

import argparse

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
from .guidance import add_guidance_options, guided_configs, parse_guidance

UNCOND = "uncond"  # --labels word for the null label (unconditional samples)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a checkpoint",
        description="Sample from the EMA weights of a checkpoint (or a run's newest checkpoint).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--count", type=positive_int, default=100, help="number of samples")
    p.add_argument(
        "--labels",
        help=f"comma-separated class labels, cycled, or {UNCOND} for unconditional samples "
        "(default: all classes)",
    )
    p.add_argument("--sampler", default=None, help="edm_heun | flow_euler | flow_heun | ...")
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed+i")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per sampler call")
    p.add_argument(
        "--nrow",
        type=positive_int,
        default=None,
        help="grid columns (default: one per cycled label up to 32, else a square grid)",
    )
    p.add_argument(
        "--out",
        default="samples.png",
        help="a .png grid, an .npz, or a new or empty directory (a path without a suffix)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_guidance_options(p)
    add_vae_option(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def _parse_labels(text: str | None) -> list[int | None] | None:
    """Labels from ``--labels``: integers, with None standing for ``uncond``."""
    if not text:
        return None
    words = [w.strip() for w in text.split(",") if w.strip()]
    try:
        return [None if w == UNCOND else int(w) for w in words] or None
    except ValueError:
        raise ConfigError(
            f"--labels must be comma-separated integers or {UNCOND}, got {text!r}"
        ) from None


def _check_labels(labels: list[int | None] | None, num_classes: int) -> list[int] | None:
    """Map ``uncond`` to the null label and refuse labels the model does not have."""
    if labels is None:
        return None
    for value in labels:
        if value is not None and not 0 <= value < num_classes:
            raise ConfigError(
                f"--labels: {value} is not a class of this model (0..{num_classes - 1}); "
                f"use {UNCOND} for unconditional samples"
            )
    return [num_classes if v is None else v for v in labels]


def run(args: argparse.Namespace) -> int:
    from ..generate import (
        check_sample_output,
        cost_meter,
        describe_cost,
        describe_guidance,
        generate,
        grid_columns,
        latent_decoder_for,
        sample_labels,
        save_samples,
    )
    from ..train import load_for_inference

    # Everything a user can get wrong is refused before the checkpoint is even read...
    check_sample_output(args.out, overwrite=args.overwrite)
    requested = _parse_labels(args.labels)
    guidance = parse_guidance(args)
    device = resolve_device(args.device)
    model, config, step = load_for_inference(args.checkpoint, device)
    # ... or, where it needs the model (its routes and depth), before any sampling.
    (config,) = guided_configs(config, *guidance)
    num_classes = config.model.num_classes
    pool = _check_labels(requested, num_classes)
    labels = sample_labels(args.count, num_classes, pool)
    # Latent models: load the VAE before sampling so a bad --vae fails at once.
    decode = latent_decoder_for(config, vae_path(args), device)
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
        meter=(meter := cost_meter(model)),
        progress=True,
    )
    images = torch.cat([(decode(x) if decode else x).cpu() for x, _ in batches])
    nrow = args.nrow or grid_columns(args.count, len(pool) if pool else num_classes)
    out = save_samples(images, labels, args.out, nrow=nrow)
    print(
        f"wrote {len(labels)} samples from step {step} to {out} | guidance "
        f"{describe_guidance(config)} | {describe_cost(meter.per_image())}"
    )
    return 0
