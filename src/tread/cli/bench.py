"""``tread bench``: dense vs routed training-step speed, side by side in one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from .common import HelpFormatter, add_runtime_options, positive_int, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time training steps dense vs routed (images/s, memory, FLOPs, speed-up)",
        description="Full training steps (forward, backward, AdamW), both arms interleaved, "
        "medians of repeats; the speed-up is shown beside the ideal from the cost model.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"], help="registry names")
    p.add_argument(
        "--input-sizes",
        nargs="+",
        type=positive_int,
        default=[32],
        help="latent sides (32 = 256 tokens at patch 2)",
    )
    p.add_argument("--batch", type=positive_int, default=32, help="images per step")
    p.add_argument("--route-start", type=int, default=2, help="first routed block")
    p.add_argument(
        "--route-end", type=int, default=-4, help="last routed block (negative: from the end)"
    )
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of tokens that skip")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both arms")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds (the median is reported)"
    )
    p.add_argument("--steps-per-repeat", type=positive_int, default=2, help="steps per timed round")
    p.add_argument("--json", default=None, help="write results as JSON here")
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import benchmark_step, format_table
    from ..models import MODEL_CONFIGS
    from ..routing import Route

    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    unknown = [name for name in args.models if name not in MODEL_CONFIGS]
    if unknown:
        raise ConfigError(
            f"--models: unknown model {unknown[0]!r}; known: {', '.join(MODEL_CONFIGS)}"
        )
    rows = []
    for name in args.models:
        for size in args.input_sizes:
            depth = MODEL_CONFIGS[name].depth
            try:
                route = Route(args.route_start, args.route_end, args.ratio).resolve(depth)
            except ValueError as err:
                raise ConfigError(f"--route-start/--route-end/--ratio: {err}") from None
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
