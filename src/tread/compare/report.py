"""Writing a comparison: compare.json first, then report.md and the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import ARMS, MIN_EVAL_POINTS, MIN_STEPS
from .summary import fmt, json_safe, plus_minus


def write_outputs(out: Path, summary: dict[str, Any], title: str) -> Path:
    """compare.json first (a plotting failure must not lose the numbers), report.md, plots.

    Returns:
        The report's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    report = write_report(out, summary, title)
    plot_fd(summary, out / "fd.png", title=f"Dense vs TREAD, {summary['budget']}")
    from ..visual import plot_curves

    plot_curves(
        {arm: summary[arm]["acc_vs_steps"] for arm in ARMS},
        out / "acc_vs_steps.png",
        xlabel="step",
        ylabel="conditional accuracy",
        title="Accuracy vs steps",
    )
    _side_by_side(out)
    return report


def plot_fd(summary: dict[str, Any], path: Path, *, title: str) -> Path:
    """The two-panel figure: FD vs training wall-clock (min) | FD vs steps, both arms."""
    from ..visual import plot_panels

    by_time = {arm: [(x / 60, y) for x, y in summary[arm]["fd_vs_time"]] for arm in ARMS}
    by_steps = {arm: summary[arm]["fd_vs_steps"] for arm in ARMS}
    return plot_panels(
        [(by_time, "training wall-clock (min)"), (by_steps, "step")],
        path,
        ylabel="FD (lower is better)",
        title=title,
        log_y=True,
    )


def write_report(out: Path, summary: dict[str, Any], title: str) -> Path:
    """report.md: setup, table, conclusion with its noise band, the two named ratios."""
    ev = summary["eval"]
    chosen = f" ({ev['chosen']})" if ev.get("chosen") else ""
    lines = [
        f"# Dense vs TREAD: {title}",
        "",
        f"Budget: {summary['budget']} (training time; evaluation excluded). Routes of the TREAD "
        f"arm: {summary['routes']}. Evaluation every {ev['every']} steps and at the end"
        f"{chosen}. FD = Fréchet distance in the "
        f"packaged `{ev['feature_net']}` classifier's features over {ev['num_samples']} EMA "
        f"samples ({ev['sampler']}, {ev['sample_steps']} steps, seed {ev['seed']}); not FID.",
        "",
        "| arm | steps | train min | it/s (median) | evaluations | final FD | best FD | "
        "final acc | final FD over seeds (mean ± half-range) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        s = summary[arm]
        band = s["final_fd_seeds"]
        seeds = f"{plus_minus(band)} ({len(band['fd'])} seeds)" if band else "–"
        lines.append(
            f"| {arm} | {s['steps']} | {fmt(s['train_minutes'], '.1f')} | "
            f"{fmt(s['median_it_s'], '.2f')} | {s['eval_points']} | "
            f"{fmt(s['final_fd'], '.2f')} | {fmt(s['best_fd'], '.2f')} | "
            f"{fmt(s['final_acc'], '.3f')} | "
            f"{seeds} |"
        )
    lines += ["", f"**Conclusion.** {summary['conclusion']['text']}", ""]
    lines += [speedup_sentence(summary)]
    reach = summary.get("tread_reaches_dense_final_fd")
    if reach:
        lines += ["", reach_sentence(summary)]
    lines += [
        "",
        "The seed-noise band is the spread of each arm's final EMA model over sample seeds "
        "(disjoint per-sample seeds, same labels): the sampling noise of a fixed model, not "
        "training-seed noise, which would move the curves further. No conclusion is drawn "
        f"when the seed ranges overlap or a run has fewer than {MIN_EVAL_POINTS} evaluations "
        f"or {MIN_STEPS} steps.",
        "",
        "![FD vs training wall-clock and vs steps](fd.png)",
        "",
        "![accuracy vs steps](acc_vs_steps.png)",
        "",
        "![samples](samples_side_by_side.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def speedup_sentence(summary: dict[str, Any]) -> str:
    """The training-step speed-up (it/s ratio), measured and ideal, or why it is missing."""
    speed = summary["training_step_speedup"]
    ideal = f"{fmt(speed['ideal_flop_ratio'], '.2f')}x ideal from the cost model"
    if speed["measured_it_s_ratio"] is None:
        return f"Training-step speed-up (it/s ratio): not measured, {speed['note']}; {ideal}."
    return (
        f"Training-step speed-up (it/s ratio, TREAD over dense, medians): "
        f"{speed['measured_it_s_ratio']:.2f}x measured, {ideal} "
        f"({100 * speed['fraction_of_ideal']:.0f}% of ideal)."
    )


def reach_sentence(summary: dict[str, Any]) -> str:
    """When TREAD reaches dense's final FD: steps- and wall-clock-to-quality ratios."""
    reach = summary["tread_reaches_dense_final_fd"]
    band = summary["dense"]["final_fd_seeds"]
    noise = (
        f"; dense's final FD itself spans ± {band['fd_half_range']:.2f} over seeds" if band else ""
    )
    if reach["steps"] is None:
        return (
            f"TREAD did not reach the dense arm's final FD ({reach['target_fd']:.2f}) within the "
            f"budget{noise}."
        )
    minutes = reach["train_seconds"] / 60 if reach["train_seconds"] is not None else None
    caveat = ""
    if summary.get("conclusion", {}).get("verdict") == "inconclusive":
        caveat = " Like the comparison above, this is inside the noise: not a conclusion."
    return (
        f"TREAD reaches the dense arm's final FD ({reach['target_fd']:.2f}) after "
        f"{reach['steps']:.0f} steps / {fmt(minutes, '.1f')} min of training: steps-to-quality "
        f"ratio {fmt(reach['steps_to_quality_ratio'], '.2f')}x, wall-clock-to-quality ratio "
        f"{fmt(reach['wallclock_to_quality_ratio'], '.2f')}x (dense's steps or minutes over "
        f"TREAD's; interpolated between evaluations{noise}).{caveat}"
    )


def _side_by_side(out: Path) -> None:
    """Each arm's newest sample grid, side by side."""
    from ..visual import plot_image_row

    newest = {}
    for arm in ARMS:
        found = sorted((out / arm / "samples").glob("step_*.png"))
        if found:
            newest[f"{arm} ({found[-1].stem.replace('_', ' ')})"] = found[-1]
    if newest:
        plot_image_row(newest, out / "samples_side_by_side.png")
