"""``tread compare``: train the dense and the TREAD arm of one config, then plot and tabulate."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .common import HelpFormatter, add_runtime_options, positive_int, set_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train dense and TREAD arms of a config side by side and plot FD over time",
        description="Trains the routed config and its dense twin (routes removed) for the same "
        "budget, evaluates FD and accuracy along the way, writes plots, grids and a table.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="*", help="[PRESET or file.yaml] then key=value overrides")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="training wall-clock per arm, evaluation excluded",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="equal steps per arm instead of equal wall-clock",
    )
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between evals")
    p.add_argument("--eval-samples", type=positive_int, default=None)
    add_runtime_options(p, device=False)
    p.set_defaults(func=run, threads_from_config=True)


def run(args: argparse.Namespace) -> int:
    from ..compare import ARMS, arm_configs, fmt, summarize, write_report
    from ..config import load_config, split_config_args
    from ..train import train
    from ..train.evaluation import default_eval_hook

    preset, overrides = split_config_args(args.config)
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    config = load_config(preset, overrides)
    set_threads(config.train.num_threads)
    out = Path(args.out)
    minutes = None if args.steps else args.minutes
    if args.steps:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, steps=args.steps)
        )
    arms = arm_configs(
        config,
        out,
        minutes=minutes,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
    )
    for name, arm in arms.items():
        print(f"== {name} arm -> {arm.train.run_dir}", flush=True)
        train(arm, eval_hook=default_eval_hook(arm), progress=True)
    summary = summarize({name: Path(arm.train.run_dir) for name, arm in arms.items()})
    budget = f"{minutes:g} min of training per arm" if minutes else f"{args.steps} steps per arm"
    report = write_report(out, summary, config, budget)
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    for arm in ARMS:
        s = summary[arm]
        print(
            f"{arm:>6}: {s['steps']} steps, {s['train_minutes']:.1f} min, "
            f"final FD {fmt(s['final_fd'], '.2f')}, acc {fmt(s['final_acc'], '.3f')}"
        )
    print(f"report: {report}")
    return 0
