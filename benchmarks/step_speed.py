"""Dense vs TREAD training-step speed for DiT-S/2 at 256 tokens with Route(2, 8, 0.5).

Usage: python benchmarks/step_speed.py [--batch 32] [--repeats 5] [--model DiT-S/2] [--json out]
Prints the measured speed-up beside the ideal one from the analytic cost model.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from tread import Route
from tread.bench import benchmark_step, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-repeat", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = benchmark_step(
        args.model,
        [Route(2, -4, 0.5)],
        input_size=32,  # 32x32 latents at patch 2 = 256 tokens
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        steps_per_repeat=args.steps_per_repeat,
    )
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads")
    print(format_table([result]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.to_dict(), handle, indent=2)


if __name__ == "__main__":
    main()
