"""Guidance flags shared by ``tread sample`` and ``tread eval``: mode, weight(s), interval and the
sparse-guidance branches, turned into checked configs before any sampling."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # the config package is loaded with the checkpoint, not at CLI start-up
    from ..config import Config


def add_guidance_options(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """The guidance flags of ``tread sample`` and ``tread eval`` (``sweep``: lists allowed)."""
    several = ", comma-separated for a sweep" if sweep else ""
    p.add_argument(
        "--guidance",
        default=None,
        metavar="W[,W...]" if sweep else "W",
        help=f"guidance weight{several}: the CFG scale or SG's omega; 1 = off "
        "(default: the run's sample.guidance)",
    )
    p.add_argument(
        "--guidance-mode",
        default=None,
        metavar="MODE[,MODE...]" if sweep else "MODE",
        help=f"cfg | sg | cfg+sg{', comma-separated (one figure)' if sweep else ''} "
        "(default: the run's sample.guidance_mode)",
    )
    p.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO,HI",
        help="guide only where sigma (EDM) or t (flow) is in [LO, HI]; 'none' guides "
        "every step (default: the run's sample.guidance_interval)",
    )
    p.add_argument(
        "--sg-strong",
        default=None,
        metavar="GAMMA",
        help="skip ratio of the SG strong branch, in [0, 1) (default: sample.sg_strong_ratio, "
        "0 = dense)",
    )
    p.add_argument(
        "--sg-weak",
        default=None,
        metavar="GAMMA",
        help="skip ratio of the SG weak branch, above --sg-strong (default: "
        "sample.sg_weak_ratio, else the training route's ratio)",
    )
    p.add_argument(
        "--sg-route",
        default=None,
        metavar="START,END",
        help="blocks both SG branches route over, inclusive (default: "
        "sample.sg_route, else the training routes)",
    )


def _numbers(flag: str, text: str, kind: type = float) -> list[Config]:
    """``"1,1.5"`` -> [1.0, 1.5]; anything else is a one-line ConfigError naming the flag."""
    words = [w.strip() for w in text.split(",")]
    try:
        values = [kind(w) for w in words]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ConfigError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} {text!r}: values must be finite")
    return values


def parse_guidance(
    args: argparse.Namespace, *, sweep: bool = False
) -> tuple[list[float | None], list[str | None], dict[str, Any]]:
    """Read the guidance flags (before any checkpoint is loaded).

    Args:
        args: parsed arguments of :func:`add_guidance_options`.
        sweep: several weights and modes allowed (``tread eval``).

    Returns:
        (weights, modes, overrides): the weights and modes to run ([None] = the run's), and
        the other ``sample:`` overrides for :func:`tread.generate.with_guidance`.
    """
    from ..sampling import GUIDANCE_MODES

    weights: list[float | None] = [None]
    if args.guidance is not None:
        weights = list(dict.fromkeys(_numbers("--guidance", args.guidance)))
    modes: list[str | None] = [None]
    if args.guidance_mode is not None:
        modes = list(dict.fromkeys(m.strip() for m in args.guidance_mode.split(",")))
        for mode in modes:
            if mode not in GUIDANCE_MODES:
                raise ConfigError(
                    f"--guidance-mode {args.guidance_mode!r}: {mode!r} is not one of "
                    f"{', '.join(GUIDANCE_MODES)}"
                )
    if not sweep:
        for flag, values in (("--guidance", weights), ("--guidance-mode", modes)):
            if len(values) > 1:
                raise ConfigError(f"{flag} takes one value here; sweeps are for tread eval")
    overrides: dict[str, Any] = {}
    if args.guidance_interval is not None:
        text = args.guidance_interval.strip().lower()
        interval = [] if text == "none" else _numbers("--guidance-interval", text)
        if len(interval) not in (0, 2):
            raise ConfigError(f"--guidance-interval {args.guidance_interval!r}: expected LO,HI")
        overrides["guidance_interval"] = interval
    for flag, key in (("--sg-strong", "sg_strong_ratio"), ("--sg-weak", "sg_weak_ratio")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            numbers = _numbers(flag, value)
            if len(numbers) != 1:
                raise ConfigError(f"{flag} {value!r}: expected one number")
            overrides[key] = numbers[0]
    if args.sg_route is not None:
        route = _numbers("--sg-route", args.sg_route, int)
        if len(route) != 2:
            raise ConfigError(f"--sg-route {args.sg_route!r}: expected START,END")
        overrides["sg_route"] = route
    return weights, modes, overrides


def guided_configs(
    config: Config, weights: list[float | None], modes: list[str | None], overrides: dict[str, Any]
) -> list[Config]:
    """One checked config per (mode, weight) pair, modes outermost.

    Raises:
        ConfigError: a setting the config refuses, or SG flags without an SG mode.
    """
    from ..generate import with_guidance

    configs = [
        with_guidance(config, guidance_mode=mode, guidance=weight, **overrides)
        for mode in modes
        for weight in weights
    ]
    sg_flags = [k for k in ("sg_strong_ratio", "sg_weak_ratio", "sg_route") if k in overrides]
    if sg_flags and all(c.sample.guidance_mode == "cfg" for c in configs):
        flag = "--" + sg_flags[0].replace("_ratio", "").replace("_", "-")
        raise ConfigError(f"{flag} applies to --guidance-mode sg or cfg+sg, but the mode is cfg")
    return configs
