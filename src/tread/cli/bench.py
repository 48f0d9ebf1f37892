"""``tread bench``: dense vs routed training-step speed, side by side in one run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..integrations.diffusers_configs import DIFFUSERS_CONFIGS
from .common import HelpFormatter, add_runtime_options, positive_int, resolve_device

if TYPE_CHECKING:
    from ..bench import BenchResult
    from ..routing import Route

DEFAULT_MODELS = ("DiT-S/2", "DiT-B/2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time training steps dense vs routed (images/s, memory, FLOPs, speed-up)",
        description="Full training steps (forward, backward, AdamW), both arms interleaved, "
        "medians of repeats; the speed-up is shown beside the ideal (tread models: from the "
        "cost model; diffusers models: counted FLOPs of one forward per arm).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"registry names (default: {' '.join(DEFAULT_MODELS)}, unless --diffusers is given)",
    )
    p.add_argument(
        "--diffusers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="diffusers transformers (random init) routed through hooks, by size: "
        f"{', '.join(DIFFUSERS_CONFIGS)}",
    )
    p.add_argument(
        "--input-sizes",
        nargs="+",
        type=positive_int,
        default=[32],
        help="latent sides of --models (32 = 256 tokens at patch 2); --diffusers sizes are fixed",
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


def _route(args: argparse.Namespace, depth: int) -> Route:
    """The route of the flags, resolved against a model of ``depth`` blocks."""
    from ..routing import Route

    try:
        return Route(args.route_start, args.route_end, args.ratio).resolve(depth)
    except ValueError as err:
        raise ConfigError(f"--route-start/--route-end/--ratio: {err}") from None


def _run_or_refuse_oom(
    bench: Callable[..., BenchResult],
    name: str,
    route: Route,
    options: dict[str, Any],
    timing: dict[str, Any],
) -> BenchResult:
    """One benchmark; CUDA running out of memory becomes a one-line error (exit status 2).

    Args:
        bench: ``benchmark_step`` or ``benchmark_diffusers``.
        name: the model's registry or diffusers name.
        route: its resolved route.
        options: the model's own keywords (e.g. ``input_size``).
        timing: batch, device, precision, compile and the repeat counts.

    Returns:
        The benchmark's result.

    Raises:
        ConfigError: the batch does not fit in the device's memory (a script searching for the
            largest batch that fits tries a smaller one; see scripts/gpu_protocol.sh).
    """
    import torch

    try:
        return bench(name, [route], **options, **timing)
    except torch.cuda.OutOfMemoryError:
        compiled = ", compiled" if timing["compile"] else ""
        raise ConfigError(
            f"--batch {timing['batch']}: out of memory on {timing['device']} for {name} "
            f"({timing['precision']}{compiled}); try a smaller --batch"
        ) from None


def run(args: argparse.Namespace) -> int:
    from ..bench import benchmark_diffusers, benchmark_step, format_table
    from ..models import MODEL_CONFIGS

    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    diffusers = args.diffusers or []
    default = [] if diffusers else list(DEFAULT_MODELS)  # --diffusers alone: only those
    models = args.models if args.models is not None else default
    for flag, names, known in (
        ("--models", models, MODEL_CONFIGS),
        ("--diffusers", diffusers, DIFFUSERS_CONFIGS),
    ):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(f"{flag}: unknown model {unknown[0]!r}; known: {', '.join(known)}")
    timing = {
        "batch": args.batch,
        "device": device,
        "precision": precision,
        "compile": args.compile,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps_per_repeat,
    }
    # Every route is resolved (and a bad one refused) before the first benchmark runs.
    jobs = [
        (benchmark_step, name, _route(args, MODEL_CONFIGS[name].depth), {"input_size": size})
        for name in models
        for size in args.input_sizes
    ]
    jobs += [
        (benchmark_diffusers, name, _route(args, DIFFUSERS_CONFIGS[name].depth), {})
        for name in diffusers
    ]
    rows = []
    for bench, name, route, options in jobs:
        result = _run_or_refuse_oom(bench, name, route, options, timing)
        rows.append(result)
        print(format_table([result]).splitlines()[2], flush=True)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        print(f"wrote {args.json}")
    return 0
