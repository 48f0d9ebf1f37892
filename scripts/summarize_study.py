"""Tables and plots of the digits study (scripts/digits_study.sh) for docs/results.md.

Usage: python scripts/summarize_study.py runs/study [--docs docs/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tread.compare import ARMS, eval_points
from tread.config import load_config
from tread.routing import describe_routes
from tread.visual import plot_curves, read_metrics

RATIOS = ["ratio_0.00", "ratio_0.25", "ratio_0.50", "ratio_0.75"]
PLACEMENTS = ["ratio_0.00", "ratio_0.50", "place_0-4", "place_2-7", "place_1-6"]
LENGTHS = ["place_3-4", "ratio_0.50", "place_1-4"]  # same end block, 2 / 3 / 4 blocks routed
COMPARES = {"compare5": "5 min (default)", "compare8": "8 min"}
EXTRA_SEEDS = (1000, 2000)


def describe(run: Path) -> dict:
    config = load_config(run / "config.yaml")
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    fd = eval_points(run, "fd", "step")
    acc = eval_points(run, "acc", "step")
    return {
        "name": run.name,
        "route": describe_routes(config.routes(), config.model.depth),
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


def compare_table(study: Path) -> str:
    """Equal wall-clock runs: per arm, FD/acc of the final EMA checkpoint at three sample seeds."""
    header = (
        "| budget | arm | steps | it/s (median) | FD seed 0 / 1000 / 2000 | FD mean | acc mean |"
    )
    lines = [header, "|" + "---|" * 7]
    for name, budget in COMPARES.items():
        path = study / name / "compare.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        for arm in ARMS:
            s = summary[arm]
            fds, accs = [s["final_fd"]], [s["final_acc"]]
            for seed in EXTRA_SEEDS:
                extra = study / name / f"{arm}_eval_{seed}.json"
                if extra.is_file():
                    metrics = json.loads(extra.read_text())["metrics"]
                    fds.append(metrics["fd"])
                    accs.append(metrics["acc"])
            lines.append(
                f"| {budget} | {arm} | {s['steps']} | {s['median_it_s']:.2f} | "
                f"{' / '.join(f'{x:.1f}' for x in fds)} | {statistics.mean(fds):.1f} | "
                f"{statistics.mean(accs):.3f} |"
            )
        speed = summary["step_speedup"]
        lines.append(
            f"| {budget} | step speed-up | {speed['measured']:.2f}x measured | "
            f"{speed['ideal']:.2f}x ideal | | | |"
        )
    return "\n".join(lines)


def plot_compare(summary: dict, path: Path, budget: str) -> None:
    """FD against training wall-clock and against steps, both arms, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120, sharey=True)
    for arm in ARMS:
        for ax, key, scale in ((axes[0], "fd_vs_time", 60), (axes[1], "fd_vs_steps", 1)):
            xs, ys = zip(*summary[arm][key], strict=True)
            ax.plot([x / scale for x in xs], ys, marker="o", ms=3, label=arm)
    axes[0].set_xlabel("training wall-clock (min)")
    axes[1].set_xlabel("step")
    axes[0].set_ylabel("FD (lower is better)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.suptitle(f"Dense vs TREAD, equal training wall-clock ({budget}, digits)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
        plot_compare(summary, args.docs / "compare8_fd.png", COMPARES["compare8"])


if __name__ == "__main__":
    main()
