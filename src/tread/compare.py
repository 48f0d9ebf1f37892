"""``tread compare``: the dense and the routed arm of one config, side by side.

Both arms share every setting but ``model.routes`` (the dense arm has none), train for the same
number of steps or the same training wall-clock, and are evaluated along the way (FD and
conditional accuracy of the EMA weights, same seeds and labels). Outputs in ``--out``: one run
directory per arm, ``fd_vs_time.png``, ``fd_vs_steps.png``, ``samples_side_by_side.png``,
``report.md`` and ``compare.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import ConfigError
from .routing import describe_routes
from .visual import read_metrics

ARMS = ("dense", "tread")


def arm_configs(
    config: Config,
    out: Path,
    *,
    minutes: float | None,
    eval_every: int | None,
    eval_samples: int | None,
) -> dict[str, Config]:
    """The two arms: identical but for routes and run directory."""
    if not config.model.routes:
        raise ConfigError("compare needs a config with model.routes (the TREAD arm)")
    if minutes is not None:
        # Equal wall-clock: the step count is only a cap, far beyond what the budget allows.
        train = dataclasses.replace(config.train, steps=10**7, max_minutes=minutes)
    else:
        train = dataclasses.replace(config.train, max_minutes=None)
    evaluation = dataclasses.replace(
        config.eval,
        every=eval_every if eval_every is not None else (config.eval.every or 250),
        num_samples=eval_samples or config.eval.num_samples,
    )
    arms = {}
    for name in ARMS:
        model = config.model if name == "tread" else dataclasses.replace(config.model, routes=[])
        arms[name] = dataclasses.replace(
            config,
            model=model,
            train=dataclasses.replace(train, run_dir=str(out / name)),
            eval=evaluation,
        )
    return arms


def eval_points(run_dir: Path, key: str, x: str) -> list[tuple[float, float]]:
    """(x, metric) pairs of a run's evaluation rows; x is 'step' or 'train_s'."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if f"eval/{key}" in r]
    return [(float(r[x]), float(r[f"eval/{key}"])) for r in rows]


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First x at which a decreasing-is-better curve reaches ``target`` (linear interpolation)."""
    previous = None
    for x, y in points:
        if y <= target:
            if previous is None:
                return x
            (x0, y0) = previous
            return x0 + (x - x0) * (y0 - target) / (y0 - y) if y0 != y else x
        previous = (x, y)
    return None


def summarize(runs: dict[str, Path]) -> dict[str, Any]:
    """Final numbers per arm plus the routed arm's time/steps to reach dense's final FD."""
    summary: dict[str, Any] = {}
    for name, run in runs.items():
        rows = read_metrics(run / "metrics.jsonl")
        train_rows = [r for r in rows if "loss" in r]
        fd_time = eval_points(run, "fd", "train_s")
        fd_steps = eval_points(run, "fd", "step")
        acc = eval_points(run, "acc", "step")
        rates = sorted(r["it_s"] for r in train_rows[1:]) or [float("nan")]
        summary[name] = {
            # The last row of any kind: a final evaluation may follow the last logged step.
            "steps": max((int(r["step"]) for r in rows), default=0),
            "train_minutes": max((r.get("train_s", 0.0) for r in rows), default=0.0) / 60,
            "median_it_s": rates[len(rates) // 2],
            "final_fd": fd_steps[-1][1] if fd_steps else None,
            "best_fd": min(y for _, y in fd_steps) if fd_steps else None,
            "final_acc": acc[-1][1] if acc else None,
            "fd_vs_time": fd_time,
            "fd_vs_steps": fd_steps,
            "acc_vs_steps": acc,
        }
    dense, tread = summary["dense"], summary["tread"]
    summary["step_speedup"] = {
        "measured": tread["median_it_s"] / dense["median_it_s"],
        "ideal": _ideal_speedup(runs["tread"]),
    }
    if dense["final_fd"] is not None and tread["fd_vs_time"]:
        reach_t = time_to_reach(tread["fd_vs_time"], dense["final_fd"])
        reach_s = time_to_reach(tread["fd_vs_steps"], dense["final_fd"])
        summary["tread_reaches_dense_final_fd"] = {
            "train_seconds": reach_t,
            "steps": reach_s,
            "wallclock_speedup": (dense["fd_vs_time"][-1][0] / reach_t) if reach_t else None,
            "step_speedup": (dense["fd_vs_steps"][-1][0] / reach_s) if reach_s else None,
        }
    return summary


def _ideal_speedup(run: Path) -> float:
    """The cost model's dense/routed FLOP ratio for a run's saved config (built on meta)."""
    import torch

    from .cost import ideal_speedup
    from .train.builders import build_from_config

    config = load_config(run / "config.yaml")
    with torch.device("meta"):
        model = build_from_config(config)
    return ideal_speedup(model, config.routes())


def fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_report(out: Path, summary: dict[str, Any], config: Config, budget: str) -> Path:
    """Plots and a markdown table."""
    from .visual import plot_curves

    series_t = {f"{arm}": [(x / 60, y) for x, y in summary[arm]["fd_vs_time"]] for arm in ARMS}
    series_s = {f"{arm}": summary[arm]["fd_vs_steps"] for arm in ARMS}
    series_a = {f"{arm}": summary[arm]["acc_vs_steps"] for arm in ARMS}
    plot_curves(
        series_t,
        out / "fd_vs_time.png",
        xlabel="training wall-clock (min)",
        ylabel="FD (lower is better)",
        title="FD vs wall-clock",
        log_y=True,
    )
    plot_curves(
        series_s,
        out / "fd_vs_steps.png",
        xlabel="step",
        ylabel="FD (lower is better)",
        title="FD vs steps",
        log_y=True,
    )
    plot_curves(
        series_a,
        out / "acc_vs_steps.png",
        xlabel="step",
        ylabel="conditional accuracy",
        title="Accuracy vs steps",
    )
    _side_by_side(out)

    routes = describe_routes(config.routes(), config.model.depth)
    lines = [
        f"# Dense vs TREAD: {Path(config.preset).stem}",
        "",
        f"Budget: {budget}. Routes of the TREAD arm: {routes}. FD = Fréchet distance in the "
        f"packaged `{config.data.name}` classifier's features over {config.eval.num_samples} "
        f"EMA samples ({config.sample.sampler}, {config.sample.steps} steps, seed "
        f"{config.sample.seed}); not FID.",
        "",
        "| arm | steps | train min | it/s (median) | final FD | best FD | final acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        s = summary[arm]
        lines.append(
            f"| {arm} | {s['steps']} | {s['train_minutes']:.1f} | {s['median_it_s']:.2f} | "
            f"{fmt(s['final_fd'], '.2f')} | {fmt(s['best_fd'], '.2f')} | "
            f"{fmt(s['final_acc'], '.3f')} |"
        )
    speed = summary["step_speedup"]
    lines += [
        "",
        f"Training-step speed-up of the TREAD arm (median it/s ratio): "
        f"{speed['measured']:.2f}x measured, {speed['ideal']:.2f}x ideal from the cost model "
        f"({100 * speed['measured'] / speed['ideal']:.0f}% of ideal).",
    ]
    reach = summary.get("tread_reaches_dense_final_fd")
    if reach and reach["steps"] is None:
        lines += ["", "TREAD did not reach the dense arm's final FD within the budget."]
    elif reach:
        lines += [
            "",
            "TREAD reaches the dense arm's final FD after "
            f"{fmt(reach['steps'], '.0f')} steps / "
            f"{fmt(reach['train_seconds'] and reach['train_seconds'] / 60, '.1f')} min "
            f"(step speed-up {fmt(reach['step_speedup'], '.2f')}x, wall-clock speed-up "
            f"{fmt(reach['wallclock_speedup'], '.2f')}x; interpolated between evaluations).",
        ]
    lines += [
        "",
        "![FD vs wall-clock](fd_vs_time.png) ![FD vs steps](fd_vs_steps.png)",
        "",
        "![samples](samples_side_by_side.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _side_by_side(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = {}
    for arm in ARMS:
        found = sorted((out / arm / "samples").glob("step_*.png"))
        if found:
            grids[arm] = (found[-1], Image.open(found[-1]))
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 5.4), dpi=120)
    axes = axes if len(grids) > 1 else [axes]
    for ax, (arm, (path, image)) in zip(axes, grids.items(), strict=True):
        ax.imshow(image, cmap="gray")
        ax.set_title(f"{arm} ({path.stem.replace('_', ' ')})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples_side_by_side.png")
    plt.close(fig)
