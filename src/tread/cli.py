"""Command line: ``tread train | sample | eval | bench | compare | encode-latents``.

The only place that reads the environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, TREAD_VAE), sets
global torch flags (threads, TF32) and prints. Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError, TreadError

log = logging.getLogger("tread")


def _dist_info():
    from .train.dist import DistInfo

    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def _split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """First positional is a preset/YAML unless it looks like key=value."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def _set_global_flags(tf32: bool, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def cmd_train(args: argparse.Namespace) -> int:
    from .config import config_to_yaml, load_config

    preset, overrides = _split_config_args(args.config)
    config = load_config(preset, overrides)
    if args.dry_run:
        print(config_to_yaml(config), end="")
        return 0
    from .train import train

    info = _dist_info()
    _set_global_flags(config.train.tf32, config.train.num_threads)
    hook = None
    if config.eval.every:
        from .train.evaluation import default_eval_hook

        hook = default_eval_hook(config)
    result = train(config, dist=info, eval_hook=hook, progress=not args.no_progress)
    if info.is_main:
        how = "time budget reached" if result.stopped == "time" else "done"
        print(f"{how}: step {result.step}, run directory {result.run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
    return 0


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None


def _vae_path(args: argparse.Namespace) -> str | None:
    """``--vae``, else the TREAD_VAE environment variable."""
    return args.vae or os.environ.get("TREAD_VAE") or None


def cmd_sample(args: argparse.Namespace) -> int:
    from .data.vae import latent_decoder
    from .generate import generate, sample_labels
    from .train import load_for_inference
    from .visual import save_grid, to_uint8

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, step = load_for_inference(args.checkpoint, device)
    labels = sample_labels(args.count, config.model.num_classes, _parse_labels(args.labels))
    bad = [v for v in labels if not 0 <= v <= config.model.num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad[0]} is outside 0..{config.model.num_classes}")
    # Latent models: load the VAE before sampling so a bad --vae fails at once.
    decode = latent_decoder(config, _vae_path(args), device)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark_step, format_table
    from .routing import Route

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    rows = []
    for name in args.models:
        for size in args.input_sizes:
            from .models import MODEL_CONFIGS

            if name not in MODEL_CONFIGS:
                raise ConfigError(f"--models: unknown model {name!r}")
            depth = MODEL_CONFIGS[name].depth
            route = Route(args.route_start, args.route_end, args.ratio).resolve(depth)
            result = benchmark_step(
                name,
                [route],
                input_size=size,
                batch=args.batch,
                device=device,
                precision=precision,
                compile=args.compile,
                warmup=args.warmup,
                repeats=args.repeats,
                steps_per_repeat=args.steps_per_repeat,
            )
            rows.append(result)
            print(format_table([result]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.evaluation import run_eval_command

    args.vae = _vae_path(args)
    return run_eval_command(args, _dist_info())


def cmd_encode_latents(args: argparse.Namespace) -> int:
    from .data.vae import encode_dataset

    vae = _vae_path(args)
    if not vae:
        raise ConfigError("--vae PATH is required (a local diffusers AutoencoderKL folder)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        progress=True,
    )
    c, h, w = result.latent_shape
    print(
        f"wrote {result.num_latents} latents ({c}x{h}x{w} {args.dtype}, "
        f"{result.num_classes} classes) to {result.path}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare_command

    return run_compare_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tread",
        description="Train, sample, evaluate and benchmark diffusion transformers with TREAD.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (default: DiT + TREAD on the bundled digits)",
        description="Train from a preset or YAML file with dotted key=value overrides. "
        "Under torchrun every rank runs this command. Example: "
        "tread train fashion_tread train.steps=2000 model.routes.0.ratio=0.25",
    )
    p.add_argument("config", nargs="*", help="[PRESET or file.yaml] then key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="sample images from a checkpoint",
        description="Sample from the EMA weights of a checkpoint (or a run's newest checkpoint).",
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--count", type=int, default=100, help="number of samples")
    p.add_argument("--labels", help="comma-separated class labels, cycled (default: all classes)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (1 = off)")
    p.add_argument("--sampler", default=None, help="edm_heun | flow_euler | flow_heun | ...")
    p.add_argument("--steps", type=int, default=None, help="solver steps")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed+i")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--nrow", type=int, default=None, help="grid columns (PNG output)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="samples.png", help="a .png grid, an .npz, or a directory")
    p.add_argument(
        "--vae",
        default=None,
        help="local diffusers AutoencoderKL folder to decode latent models (or TREAD_VAE)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval",
        help="generate samples and compute FD/FID, KID, precision/recall, IS, accuracy",
        description="Evaluate a checkpoint against reference data with a feature network.",
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument(
        "--feature-net",
        default=None,
        help="digits | fashion_mnist | inception (default: the dataset's classifier)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="pytorch-fid Inception weights file (or TREAD_INCEPTION_WEIGHTS)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="reference: dataset split 'test'/'train', a stats .npz, or an ADM batch",
    )
    p.add_argument("--metrics", default="fd,kid,pr,is,acc", help="comma-separated metrics")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON output (default: next to the checkpoint)")
    p.add_argument(
        "--vae",
        default=None,
        help="local diffusers AutoencoderKL folder to decode latent models (or TREAD_VAE)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "encode-latents",
        help="encode images to VAE latents (.npz) for latent-space training",
        description="Encode an image folder (one sub-directory per class) or an .npz of images "
        "to posterior-mean latents with a local SD-VAE; writes latents + labels for "
        "data.name=latents. Example: tread encode-latents /data/imagenet/train "
        "data/imagenet256_latents.npz --vae /models/sd-vae-ft-ema",
    )
    p.add_argument("src", help="image folder (class sub-directories) or .npz of uint8 images")
    p.add_argument("out", help="output .npz")
    p.add_argument("--vae", default=None, help="local diffusers VAE folder (or TREAD_VAE)")
    p.add_argument("--resolution", type=int, default=256, help="resize + centre crop side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--hflip", action="store_true", help="also store latents of mirrored images")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_encode_latents)

    p = sub.add_parser(
        "bench",
        help="time training steps dense vs routed (images/s, memory, FLOPs, speed-up)",
        description="Full training steps (forward, backward, AdamW), both arms interleaved, "
        "medians of repeats; the speed-up is shown beside the ideal from the cost model.",
    )
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    p.add_argument(
        "--input-sizes",
        nargs="+",
        type=int,
        default=[32],
        help="latent sides (32 = 256 tokens at patch 2)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--route-start", type=int, default=2)
    p.add_argument("--route-end", type=int, default=-4)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both arms")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps-per-repeat", type=int, default=2)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "compare",
        help="train dense and TREAD arms of a config side by side and plot FD over time",
        description="Trains the routed config and its dense twin (routes removed) for the same "
        "budget, evaluates FD and accuracy along the way, writes plots, grids and a table.",
    )
    p.add_argument("config", nargs="*", help="[PRESET or file.yaml] then key=value overrides")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="training wall-clock per arm, evaluation excluded (default 5)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="equal steps per arm instead of equal wall-clock"
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    p.add_argument("--eval-samples", type=int, default=None)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except TreadError as err:
        print(f"tread {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tread {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
