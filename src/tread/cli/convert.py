"""``tread convert``: a published DiT / SiT checkpoint -> one .safetensors in tread's layout."""

from __future__ import annotations

import argparse
from typing import Any

from .common import HelpFormatter, add_runtime_options


def arch_value(text: str) -> tuple[str, Any]:
    """argparse type for ``--arch KEY=VALUE``: ints, floats and true/false become values."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    raw = raw.strip()
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key.strip(), value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a published DiT/SiT checkpoint to tread's .safetensors layout",
        description="Map the official facebookresearch/DiT or willisma/SiT weights (a raw state "
        "dict, or a training checkpoint's EMA) onto a tread DiT, check every shape against "
        "--model, and write one .safetensors for train.init_from / tread.load_pretrained. "
        "Example: tread convert DiT-XL-2-256x256.pt dit_xl2_256.safetensors --model DiT-XL/2",
        formatter_class=HelpFormatter,
    )
    p.add_argument("src", help="official checkpoint (.pt, .pth or .safetensors)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--model", required=True, help="DiT-family registry name, e.g. DiT-XL/2")
    p.add_argument(
        "--arch",
        type=arch_value,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="architecture override for a custom-sized checkpoint (depth=, width=, heads=, "
        "input_size=, ...); repeatable",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    add_runtime_options(p, device=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrained import convert_checkpoint

    result = convert_checkpoint(
        args.src, args.out, args.model, overwrite=args.overwrite, **dict(args.arch or ())
    )
    config = result.config
    side = config.input_size
    print(
        f"wrote {result.path}: {result.name}, {result.num_params / 1e6:.2f}M parameters, "
        f"learn_sigma {str(config.learn_sigma).lower()}, input {config.in_channels}x{side}x{side} "
        f"-> output {config.out_channels}x{side}x{side}, {config.num_classes} classes "
        f"(from {result.source})"
    )
    return 0
