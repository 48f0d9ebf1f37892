"""Seed-averaged guidance table for docs/results.md from `tread eval` JSON records.

Each record (one `tread eval` point) names its checkpoint, mode, weight, SG ratios and sample
seed; records that differ only in the seed are one row: mean ± sample standard deviation of FD
over seeds, mean accuracy, NFE and forward GFLOPs per image.

Usage: python scripts/guidance_table.py LABEL=GLOB [LABEL=GLOB ...] [--plot FD_VS_FLOPS.png]
  e.g. python scripts/guidance_table.py "TREAD=runs/guidance/seeds/tread_*.json" \\
                                        "dense=runs/guidance/seeds/dense_*.json"
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from collections import defaultdict
from pathlib import Path


def row_key(record: dict) -> tuple:
    """What identifies a configuration: everything but the sample seed."""
    mode = record.get("guidance_mode") or "cfg"
    weight = float(record.get("guidance") or 1.0)
    if weight == 1.0:
        mode = "unguided"
    sg = None
    if mode in ("sg", "cfg+sg"):
        sg = (record.get("sg_strong_ratio"), record.get("sg_weak_ratio"), str(record["sg_route"]))
    return (mode, weight, sg)


def describe(mode: str, sg: tuple | None) -> str:
    if sg is None:
        return mode.upper() if mode != "unguided" else mode
    strong, weak, _ = sg
    return f"{mode.upper()} (γ {strong:g}→{weak:g})"


def grouped(pattern: str) -> list[tuple[tuple, list[dict]]]:
    """Records matching ``pattern``, grouped by :func:`row_key`, in (mode, weight) order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(pattern)):
        record = json.loads(Path(path).read_text())
        if "metrics" in record:
            groups[row_key(record)].append(record)
    order = {"unguided": 0, "cfg": 1, "sg": 2, "cfg+sg": 3}
    return sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))


def rows(label: str, pattern: str) -> list[str]:
    lines = []
    for (mode, weight, sg), records in grouped(pattern):
        fds = [r["metrics"]["fd"] for r in records]
        spread = f" ± {statistics.stdev(fds):.2f}" if len(fds) > 1 else " (1 seed)"
        acc = statistics.fmean(r["metrics"]["acc"] for r in records)
        seeds = ",".join(str(r["seed"]) for r in sorted(records, key=lambda r: r["seed"]))
        first = records[0]
        lines.append(
            f"| {label} | {describe(mode, sg)} | {weight:g} | {statistics.fmean(fds):.2f}{spread} "
            f"| {acc:.3f} | {first['nfe_per_image']:g} | {first['flops_per_image'] / 1e9:.2f} "
            f"| {seeds} |"
        )
    return lines


def plot(sets: list[tuple[str, str]], out: str) -> None:
    """FD (mean, error bar = sd over seeds) vs forward GFLOPs per image, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (label, pattern) in enumerate(sets):
        for (mode, weight, sg), records in grouped(pattern):
            fds = [r["metrics"]["fd"] for r in records]
            gflops = records[0]["flops_per_image"] / 1e9
            sd = statistics.stdev(fds) if len(fds) > 1 else 0.0
            ax.errorbar(
                gflops,
                statistics.fmean(fds),
                yerr=sd,
                fmt=markers[index % 5],
                color=f"C{index}",
                capsize=3,
            )
            ax.annotate(
                f"{describe(mode, sg).split(' ')[0]} {weight:g}",
                (gflops, statistics.fmean(fds)),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=7,
            )
        ax.plot([], [], markers[index % 5], color=f"C{index}", label=label)
    ax.set_xlabel("forward GFLOPs per image (analytic)")
    ax.set_ylabel("FD (digits classifier), mean ± sd over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="LABEL=GLOB of tread eval JSON records")
    parser.add_argument("--plot", default=None, help="also write FD vs GFLOPs/image here")
    args = parser.parse_args()
    print(
        "| model | guidance | ω | FD (mean ± sd over seeds) | acc | NFE/image | GFLOPs/image "
        "| seeds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for item in args.sets:
        label, _, pattern = item.partition("=")
        for line in rows(label, pattern):
            print(line)
    if args.plot:
        plot([tuple(item.partition("=")[::2]) for item in args.sets], args.plot)


if __name__ == "__main__":
    main()
