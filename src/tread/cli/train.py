"""``tread train``: a preset or YAML file plus dotted overrides; torchrun runs it on every rank."""

from __future__ import annotations

import argparse

from .common import (
    HelpFormatter,
    add_runtime_options,
    dist_info,
    load_run_config,
    set_tf32,
    set_threads,
    vae_path,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default: DiT + TREAD on the bundled digits)",
        description="Train from a preset or YAML file with dotted key=value overrides. "
        "Under torchrun every rank runs this command. Example: "
        "tread train fashion_tread train.steps=2000 model.routes.0.ratio=0.25",
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="*", help="[PRESET or file.yaml] then key=value overrides")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check, print the resolved config and exit (writes nothing)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume even though settings such as optim.lr differ from the checkpoint's; "
        "the changes are recorded in RUN_DIR/config_changes.jsonl",
    )
    add_runtime_options(p, device=False)  # the device is train.device
    p.set_defaults(func=run, threads_from_config=True)


def run(args: argparse.Namespace) -> int:
    from ..config import config_to_yaml

    config = load_run_config(args)
    info = dist_info()
    hook = None
    eval_sources = {}
    if config.eval.every:
        from ..eval import inception_weights_from_env
        from ..train.evaluation import default_eval_hook

        # $TREAD_VAE: the VAE of a latent run's FID when eval.vae is unset.
        eval_sources = dict(inception_weights=inception_weights_from_env(), vae=vae_path(args))
        # Creating the hook checks the eval settings and writes nothing, so --dry-run does it.
        hook = default_eval_hook(config, info, **eval_sources)
    if args.dry_run:
        from ..train import resolve_run
        from ..train.init_weights import check_init_from
        from ..train.latent_eval import check_eval_settings
        from ..train.setup import check_batch_split

        resolved = resolve_run(config)
        split = check_batch_split(resolved.train, info.world_size)  # as torchrun would run it
        check_init_from(resolved)  # the source's files fit the model (shapes from headers)
        if hook is not None:  # again with the shapes from the data (the VAE's channels)
            check_eval_settings(resolved, **eval_sources)
        print(config_to_yaml(resolved), end="")
        print(f"# {split}")  # a YAML comment: the output stays a loadable config
        return 0
    from ..train import train

    set_threads(config.train.num_threads)
    set_tf32(config.train.tf32)
    result = train(
        config,
        dist=info,
        eval_hook=hook,
        progress=not args.no_progress,
        allow_changes=args.allow_changes,
    )
    if info.is_main:
        how = "time budget reached" if result.stopped == "time" else "done"
        print(f"{how}: step {result.step}, run directory {result.run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
    return 0
