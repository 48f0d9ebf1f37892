"""Where a training step's time goes, dense vs TREAD: self CPU time per op family.

Usage: python benchmarks/profile_step.py [--model DiT-S/2] [--batch 16] [--steps 2] [--top 8]

Explains speed-ups that differ from the cost model's ideal: the cost model counts matrix
products (and attention) only, so the table shows, per op family, the dense/routed time ratio
beside the ideal ratio of the whole step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import tread

FAMILIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("scaled_dot_product", "softmax")),
    ("elementwise", ("aten::gelu", "aten::mul", "aten::add", "aten::copy_", "aten::sqrt")),
    ("layer norm", ("layer_norm",)),
)


def family(op: str) -> str:
    for name, keys in FAMILIES:
        if any(key in op for key in keys):
            return name
    return "other"


def profile_arm(model, routes, batch: int, steps: int) -> tuple[dict[str, float], list]:
    """Seconds per step by op family, and the top ops, for one arm (after one warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=generator)

    def step() -> None:
        out = model(x, t, y, routes=routes, generator=generator)
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    per_family: dict[str, float] = {}
    for event in events:
        key = family(event.key)
        per_family[key] = per_family.get(key, 0.0) + event.self_cpu_time_total / 1e6 / steps
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return per_family, [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    model = tread.build_model(args.model, input_size=32, in_channels=4, num_classes=1000)
    routed = [tread.Route(2, -4, 0.5)]
    dense_s, dense_top = profile_arm(model, [], args.batch, args.steps)
    routed_s, routed_top = profile_arm(model, routed, args.batch, args.steps)
    print(f"{args.model}, 256 tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"ideal step speed-up (cost model): {tread.ideal_speedup(model, routed):.3f}x")
    print(f"{'op family':<12} {'dense s':>8} {'routed s':>9} {'ratio':>7}")
    for name in [*(f for f, _ in FAMILIES), "other"]:
        d, r = dense_s.get(name, 0.0), routed_s.get(name, 0.0)
        ratio = f"{d / r:.2f}x" if r else "-"
        print(f"{name:<12} {d:8.3f} {r:9.3f} {ratio:>7}")
    d, r = sum(dense_s.values()), sum(routed_s.values())
    print(f"{'total':<12} {d:8.3f} {r:9.3f} {d / r:6.2f}x")
    for arm, top in (("dense", dense_top), ("routed", routed_top)):
        print(f"top ops ({arm}): " + ", ".join(f"{k} {s:.3f}" for k, s in top[: args.top]))


if __name__ == "__main__":
    main()
