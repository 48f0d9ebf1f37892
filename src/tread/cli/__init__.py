"""Command line: ``tread train | sample | eval | bench | compare | encode-latents | convert``.

One module per subcommand; each has ``register(subparsers)`` (argument wiring) and ``run(args)``
(calls the library, prints). Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import TreadError
from . import bench, compare, convert, encode, evaluate, sample, train
from .common import HelpFormatter, set_threads

COMMANDS = (train, sample, evaluate, encode, bench, compare, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tread",
        description="Train, sample, evaluate and benchmark diffusion transformers with TREAD.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse; ``key=value`` overrides may also come after flags (``--dry-run train.steps=5``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = isinstance(getattr(args, "config", None), list)
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        unknown = [a for a in extra if a not in overrides or not takes_overrides]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.config = [*args.config, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if getattr(args, "threads_from_config", False) is False:
            set_threads(args.threads)  # train/compare set theirs after reading the config
        return args.func(args)
    except TreadError as err:
        print(f"tread {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tread {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main", "parse_args"]
