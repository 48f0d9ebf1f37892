"""``tread eval``: generate samples from a checkpoint and score them (FD/FID, KID, P/R, IS, acc)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import (
    HelpFormatter,
    add_runtime_options,
    add_vae_option,
    dist_info,
    positive_int,
    resolve_device,
    vae_path,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate samples and compute FD/FID, KID, precision/recall, IS, accuracy",
        description="Evaluate a checkpoint against reference data with a feature network.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--num-samples", type=positive_int, default=1000)
    p.add_argument(
        "--feature-net",
        default=None,
        help="digits | fashion_mnist | inception (default: the dataset's classifier)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="pytorch-fid Inception weights file (default: $TREAD_INCEPTION_WEIGHTS)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="reference: dataset split 'test'/'train', a stats .npz, or an ADM batch "
        "(default: eval.reference_split of the run)",
    )
    p.add_argument("--metrics", default="fd,kid,pr,is,acc", help="comma-separated metrics")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's)")
    p.add_argument("--sampler", default=None, help="default: the run's sample.sampler")
    p.add_argument("--steps", type=positive_int, default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--out", default=None, help="JSON output (default: RUN/eval/...)")
    add_vae_option(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.vae import latent_decoder
    from ..eval import inception_weights_from_env
    from ..train.checkpoint import load_for_inference, resolve_checkpoint
    from ..train.dist import init_process_group
    from ..train.evaluation import evaluate_model, feature_net_for, reference_for

    info = dist_info()
    device = resolve_device(args.device, info.local_rank)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, config, step = load_for_inference(checkpoint, device)
    vae = vae_path(args)
    decode = latent_decoder(config, vae, device)  # None: pixels
    init_process_group(info, device)
    weights = args.inception_weights or inception_weights_from_env()
    net = feature_net_for(config, args.feature_net, inception_weights=weights, device=device)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    reference = (
        reference_for(config, net, args.reference, checkpoint.parent.parent / "eval", device)
        if info.is_main
        else None
    )
    settings = {
        "sampler": args.sampler or config.sample.sampler,
        "steps": args.steps or config.sample.steps,
        "guidance": config.sample.guidance if args.guidance is None else args.guidance,
        "guidance_interval": config.sample.guidance_interval,
    }
    start = time.perf_counter()
    result = evaluate_model(
        model,
        config,
        num_samples=args.num_samples,
        metrics=metrics,
        net=net,
        reference_stats=reference,
        seed=args.seed,
        device=device,
        batch_size=args.batch_size,
        info=info,
        progress=True,
        decode=decode,
        sampler=settings["sampler"],
        steps=settings["steps"],
        guidance=settings["guidance"],
    )
    if not info.is_main:
        return 0
    metric_name = "FID" if net.name.startswith("inception") else "FD"
    record = {
        "checkpoint": str(checkpoint),
        "step": step,
        "feature_net": net.name,
        "fd_is": metric_name,
        "reference": args.reference or config.eval.reference_split,
        "num_samples": args.num_samples,
        "seed": args.seed,
        **({"vae": str(vae)} if decode else {}),
        **settings,
        "metrics": result,
        "seconds": time.perf_counter() - start,
    }
    out = (
        Path(args.out)
        if args.out
        else checkpoint
        / (
            f"eval_{net.name}_n{args.num_samples}_{settings['sampler']}{settings['steps']}"
            f"_g{settings['guidance']:g}_s{args.seed}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    parts = [f"{metric_name} {result['fd']:.3f}"] if "fd" in result else []
    labels = {
        "sfid": "sFD",
        "kid_mean": "KID",
        "precision": "P",
        "recall": "R",
        "is_mean": "IS",
        "acc": "acc",
    }
    parts += [f"{label} {result[key]:.4g}" for key, label in labels.items() if key in result]
    print(
        f"step {step} | {', '.join(parts)} | n={args.num_samples} {settings['sampler']} "
        f"steps={settings['steps']} guidance={settings['guidance']:g} seed={args.seed} "
        f"net={net.name} -> {out}"
    )
    return 0
