"""Tables and plots of the digits study (scripts/digits_study.sh) for docs/results.md.

Usage: python scripts/summarize_study.py runs/study [--docs docs/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tread.compare import ARMS, eval_points, fmt, plot_fd
from tread.config import load_config
from tread.routing import describe_routes
from tread.visual import plot_curves, read_metrics

RATIOS = ["ratio_0.00", "ratio_0.25", "ratio_0.50", "ratio_0.75"]
PLACEMENTS = ["ratio_0.00", "ratio_0.50", "place_0-4", "place_2-7", "place_1-6"]
LENGTHS = ["place_3-4", "ratio_0.50", "place_1-4"]  # same end block, 2 / 3 / 4 blocks routed
COMPARES = {"compare5": "5 min (default)", "compare8": "8 min"}


def describe(run: Path) -> dict:
    config = load_config(run / "config.yaml")
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    fd = eval_points(run, "fd", "step")
    acc = eval_points(run, "acc", "step")
    return {
        "name": run.name,
        "route": describe_routes(config.routes(), config.depth()),
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
            f"{r['train_min']:.1f} | {fmt(fd.get(500), '.1f')} | "
            f"{r['fd'][-1][1]:.1f} | {r['acc'][-1][1]:.3f} |"
        )
    return "\n".join(lines)


def compare_table(study: Path) -> str:
    """Equal wall-clock runs: per arm, FD/acc of the final EMA model at each sample seed."""
    header = (
        "| budget | arm | steps | it/s (median) | FD per seed | FD mean ± half-range | acc mean |"
    )
    lines = [header, "|" + "---|" * 7]
    for name, budget in COMPARES.items():
        path = study / name / "compare.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        for arm in ARMS:
            s = summary[arm]
            band = s["final_fd_seeds"] or {"fd": [s["final_fd"]], "acc": [s["final_acc"]]}
            seeds = " / ".join(f"{x:.1f}" for x in band["fd"])
            spread = (
                f"{band['fd_mean']:.1f} ± {band['fd_half_range']:.1f}" if "fd_mean" in band else "–"
            )
            lines.append(
                f"| {budget} | {arm} | {s['steps']} | {fmt(s['median_it_s'], '.2f')} | {seeds} | "
                f"{spread} | {statistics.mean(band['acc']):.3f} |"
            )
        speed = summary["training_step_speedup"]
        lines.append(
            f"| {budget} | training-step speed-up (it/s ratio) | "
            f"{fmt(speed['measured_it_s_ratio'], '.2f')}x measured | "
            f"{fmt(speed['ideal_flop_ratio'], '.2f')}x ideal | | | |"
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
        ("Route length", LENGTHS, "length"),
    ):
        missing = [n for n in names if n not in runs or not runs[n]["fd"]]
        if missing:  # runs (or their evaluations) missing here: leave the committed plot alone
            print(f"### {title}: skipped, missing {missing}\n")
            continue
        chosen = [runs[n] for n in names]
        print(f"### {title}\n\n{table(chosen)}\n")
        plot_curves(
            {f"{r['name']} {r['route']}": r["fd"] for r in chosen},
            args.docs / f"{file}_fd_vs_steps.png",
            xlabel="step",
            ylabel="FD",
            title=f"{title}: FD vs steps (digits)",
            log_y=True,
        )

    print(f"### Equal wall-clock\n\n{compare_table(args.study)}\n")
    path = args.study / "compare8" / "compare.json"  # the run with an evaluation every 150 steps
    if path.is_file():
        summary = json.loads(path.read_text())
        title = f"Dense vs TREAD, equal training wall-clock ({COMPARES['compare8']}, digits)"
        plot_fd(summary, args.docs / "compare8_fd.png", title=title)


if __name__ == "__main__":
    main()
