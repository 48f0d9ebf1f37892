"""``tread compare``: train the dense and the TREAD arm of one config, then plot and tabulate."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..compare import EVAL_POINTS
from .common import (
    HelpFormatter,
    add_runtime_options,
    load_run_config,
    positive_int,
    set_threads,
    vae_path,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train dense and TREAD arms of a config side by side and plot FD over time",
        description="Trains the routed config and its dense twin (routes removed) for the same "
        "budget, evaluates the run's metric along the way (FD and accuracy for pixel data; FD "
        "of pooled latents, or FID with eval.feature_net=inception, for latents), writes "
        "plots, grids and a table.",
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
    p.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="steps between evaluations (default: chosen from the budget for "
        f"{EVAL_POINTS} evaluations per arm)",
    )
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        help="samples per evaluation (default: the config's eval.num_samples)",
    )
    p.add_argument(
        "--noise-seeds",
        type=positive_int,
        default=3,
        help="sample seeds at which each arm's final model is scored: the seed-noise band "
        "of the conclusion (1 = no band, no conclusion)",
    )
    add_runtime_options(p, device=False)
    p.set_defaults(func=run, threads_from_config=True)


def run(args: argparse.Namespace) -> int:
    from .. import compare
    from ..eval import inception_weights_from_env
    from ..train import resolve_run, train
    from ..train.evaluation import default_eval_hook, eval_device
    from ..train.latent_eval import check_eval_settings

    config = load_run_config(args)
    set_threads(config.train.num_threads)
    out = Path(args.out)
    minutes = None if args.steps else args.minutes
    if args.steps:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, steps=args.steps)
        )
    # Both arms pass every check before anything is probed, trained or written.
    options = {"minutes": minutes, "eval_samples": args.eval_samples}
    checked = compare.arm_configs(config, out, eval_every=None, **options)
    resolved = {name: resolve_run(arm) for name, arm in checked.items()}
    # The in-loop and the final-seed scoring share one scorer and these sources ($TREAD_VAE:
    # the VAE of a latent run's FID when eval.vae is unset); their settings are checked with
    # the shapes from the data, so what would fail after training fails here.
    sources = dict(inception_weights=inception_weights_from_env(), vae=vae_path(args))
    for arm in resolved.values():
        check_eval_settings(arm, **sources)
    device = eval_device(config)  # where the in-loop evaluation runs (cuda:0 or the CPU)
    plan = compare.plan_intervals(
        resolved, minutes=minutes, eval_every=args.eval_every, device=device
    )
    if plan.rates:
        print(
            f"timing probe: dense {plan.rates['dense']:.2f} it/s, tread "
            f"{plan.rates['tread']:.2f} it/s -> about {plan.expected_steps} steps for the slower "
            f"arm in {minutes:g} min",
            flush=True,
        )
    arms = compare.arm_configs(
        config, out, eval_every=plan.eval_every, log_every=plan.log_every, **options
    )
    print(
        f"evaluation every {plan.eval_every} steps ({plan.note}); "
        f"training rows every {plan.log_every} steps"
    )
    # Hooks check their settings when made (and load nothing): both before the first training.
    hooks = {name: default_eval_hook(arm, progress=True, **sources) for name, arm in arms.items()}
    for name, arm in arms.items():
        print(f"== {name} arm -> {arm.train.run_dir}", flush=True)
        train(arm, eval_hook=hooks[name], progress=True)
    seed_fd = {}
    for name, arm in arms.items():
        print(f"== {name} arm: final model at {args.noise_seeds} sample seed(s)", flush=True)
        seed_fd[name] = compare.evaluate_final_seeds(
            Path(arm.train.run_dir), args.noise_seeds, device=device, progress=True, **sources
        )
    budget = f"{minutes:g} min of training per arm" if minutes else f"{args.steps} steps per arm"
    runs = {name: Path(arm.train.run_dir) for name, arm in arms.items()}
    summary = compare.summarize(runs, budget=budget, seed_fd=seed_fd, eval_note=plan.note)
    report = compare.write_outputs(out, summary, Path(config.preset).stem)
    m, label = compare.summary_metric(summary), compare.metric_label(summary)
    for arm in compare.ARMS:
        s = summary[arm]
        band = s[f"final_{m}_seeds"]
        seeds = f" (seeds: {compare.plus_minus(band, m)})" if band else ""
        acc = f", acc {compare.fmt(s['final_acc'], '.3f')}" if "final_acc" in s else ""
        print(
            f"{arm:>6}: {s['steps']} steps, {s['train_minutes']:.1f} min, "
            f"median {compare.fmt(s['median_it_s'], '.2f')} it/s, "
            f"final {label} {compare.fmt(s[f'final_{m}'], '.2f')}{seeds}{acc}"
        )
    print(compare.speedup_sentence(summary))
    if f"tread_reaches_dense_final_{m}" in summary:
        print(compare.reach_sentence(summary))
    print(summary["conclusion"]["text"])
    print(f"report: {report}")
    return 0
