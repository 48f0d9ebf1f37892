"""Tables and plots of the digits study (scripts/digits_study.sh) for docs/results.md.

Usage: python scripts/summarize_study.py runs/study [--docs docs/results]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from tread.compare import eval_points
from tread.config import load_config
from tread.visual import plot_curves, read_metrics

RATIOS = ["ratio_0.00", "ratio_0.25", "ratio_0.50", "ratio_0.75"]
PLACEMENTS = ["ratio_0.00", "ratio_0.50", "place_0-4", "place_2-7", "place_1-6"]


def describe(run: Path) -> dict:
    config = load_config(run / "config.yaml")
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    fd = eval_points(run, "fd", "step")
    acc = eval_points(run, "acc", "step")
    routes = config.routes()
    depth = config.model.depth
    route = (
        ", ".join(f"r({r.start}→{r.end}, {r.ratio:g})" for r in (x.resolve(depth) for x in routes))
        or "dense"
    )
    return {
        "name": run.name,
        "route": route,
        "steps": train_rows[-1]["step"],
        "it_s": statistics.median(r["it_s"] for r in train_rows[1:]),
        "train_min": train_rows[-1]["train_s"] / 60,
        "fd": fd,
        "acc": acc,
    }


def table(runs: list[dict]) -> str:
    header = "| run | route | steps | it/s (median) | train min | FD @500 | FD final | acc final |"
    lines = [header, "|" + "---|" * 8]
    for r in runs:
        fd = dict(r["fd"])
        lines.append(
            f"| {r['name']} | {r['route']} | {r['steps']} | {r['it_s']:.2f} | "
            f"{r['train_min']:.1f} | {fd.get(500, float('nan')):.1f} | "
            f"{r['fd'][-1][1]:.1f} | {r['acc'][-1][1]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    args.docs.mkdir(parents=True, exist_ok=True)
    runs = {
        p.name: describe(p) for p in sorted(args.study.iterdir()) if (p / "metrics.jsonl").is_file()
    }
    for title, names, file in (
        ("Skip ratio", RATIOS, "ratio"),
        ("Route placement", PLACEMENTS, "placement"),
    ):
        chosen = [runs[n] for n in names if n in runs and runs[n]["fd"]]
        print(f"### {title}\n\n{table(chosen)}\n")
        plot_curves(
            {f"{r['name']} {r['route']}": r["fd"] for r in chosen},
            args.docs / f"{file}_fd_vs_steps.png",
            xlabel="step",
            ylabel="FD",
            title=f"{title}: FD vs steps (digits)",
            log_y=True,
        )


if __name__ == "__main__":
    main()
