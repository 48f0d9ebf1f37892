"""Writing a comparison: compare.json first, then report.md and the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import ARMS, MIN_EVAL_POINTS, MIN_STEPS
from .summary import fmt, json_safe, metric_label, plus_minus, summary_metric


def write_outputs(out: Path, summary: dict[str, Any], title: str) -> Path:
    """compare.json first (a plotting failure must not lose the numbers), report.md, plots.

    Returns:
        The report's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    report = write_report(out, summary, title)
    m = summary_metric(summary)
    plot_fd(summary, out / f"{m}.png", title=f"Dense vs TREAD, {summary['budget']}")
    if _has_accuracy(summary):  # pixel runs; no classifier scores a latent run's samples
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
    """The two-panel figure: the run's metric (FD, FD of pooled latents or FID) vs training
    wall-clock (min) | vs steps, both arms."""
    from ..visual import plot_panels

    m = summary_metric(summary)
    by_time = {arm: [(x / 60, y) for x, y in summary[arm][f"{m}_vs_time"]] for arm in ARMS}
    by_steps = {arm: summary[arm][f"{m}_vs_steps"] for arm in ARMS}
    return plot_panels(
        [(by_time, "training wall-clock (min)"), (by_steps, "step")],
        path,
        ylabel=f"{metric_label(summary)} (lower is better)",
        title=title,
        log_y=True,
    )


def write_report(out: Path, summary: dict[str, Any], title: str) -> Path:
    """report.md: setup, table, conclusion with its noise band, the two named ratios."""
    ev = summary["eval"]
    m, label = summary_metric(summary), metric_label(summary)
    accuracy = _has_accuracy(summary)
    chosen = f" ({ev['chosen']})" if ev.get("chosen") else ""
    acc_column = " final acc |" if accuracy else ""
    lines = [
        f"# Dense vs TREAD: {title}",
        "",
        f"Budget: {summary['budget']} (training time; evaluation excluded). Routes of the TREAD "
        f"arm: {summary['routes']}. Evaluation every {ev['every']} steps and at the end"
        f"{chosen}. {_metric_sentence(summary)}",
        "",
        f"| arm | steps | train min | it/s (median) | evaluations | final {label} | "
        f"best {label} |{acc_column} final {label} over seeds (mean ± half-range) |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if accuracy else ""),
    ]
    for arm in ARMS:
        s = summary[arm]
        band = s[f"final_{m}_seeds"]
        seeds = f"{plus_minus(band, m)} ({len(band[m])} seeds)" if band else "–"
        acc = f"{fmt(s['final_acc'], '.3f')} | " if accuracy else ""
        lines.append(
            f"| {arm} | {s['steps']} | {fmt(s['train_minutes'], '.1f')} | "
            f"{fmt(s['median_it_s'], '.2f')} | {s['eval_points']} | "
            f"{fmt(s[f'final_{m}'], '.2f')} | {fmt(s[f'best_{m}'], '.2f')} | "
            f"{acc}"
            f"{seeds} |"
        )
    lines += ["", f"**Conclusion.** {summary['conclusion']['text']}", ""]
    lines += [speedup_sentence(summary)]
    reach = summary.get(f"tread_reaches_dense_final_{m}")
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
        f"![{label} vs training wall-clock and vs steps]({m}.png)",
        "",
    ]
    if accuracy:
        lines += ["![accuracy vs steps](acc_vs_steps.png)", ""]
    lines += ["![samples](samples_side_by_side.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _metric_sentence(summary: dict[str, Any]) -> str:
    """What the report's metric is, honestly named (and why a latent run has no accuracy)."""
    ev = summary["eval"]
    m = summary_metric(summary)
    sampling = (
        f"{ev['num_samples']} EMA samples ({ev['sampler']}, {ev['sample_steps']} steps, "
        f"seed {ev['seed']})"
    )
    if m == "fd":
        return (
            f"FD = Fréchet distance in the packaged `{ev['feature_net']}` classifier's features "
            f"over {sampling}; not FID."
        )
    if m == "fd_latent":
        against = (
            "a seeded subset of the training latents"
            if ev["reference"] == "train"
            else f"the latent statistics in `{ev['reference']}`"
        )
        return (
            f"FD (pooled latents) = Fréchet distance between the `{ev['feature_net']}` features "
            f"(average-pooled latents) of {sampling} and of {against}: measured in latent space, "
            "it is neither FID nor a classifier's FD and compares only runs on the same data. "
            "No accuracy for latent runs: no classifier reads latents."
        )
    return (
        f"FID = Fréchet distance in Inception-v3 features between {sampling}, decoded by the "
        f"VAE, and the real images of `{ev['reference']}`. No accuracy for latent runs: "
        "Inception's classes are not the run's labels."
    )


def _has_accuracy(summary: dict[str, Any]) -> bool:
    """Pixel runs log a classifier's conditional accuracy; latent runs none."""
    return summary_metric(summary) == "fd"


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
    """When TREAD reaches dense's final metric: steps- and wall-clock-to-quality ratios."""
    m, label = summary_metric(summary), metric_label(summary)
    reach = summary[f"tread_reaches_dense_final_{m}"]
    target = reach[f"target_{m}"]
    band = summary["dense"][f"final_{m}_seeds"]
    noise = (
        f"; dense's final {label} itself spans ± {band[f'{m}_half_range']:.2f} over seeds"
        if band
        else ""
    )
    if reach["steps"] is None:
        return (
            f"TREAD did not reach the dense arm's final {label} of {target:.2f} within the "
            f"budget{noise}."
        )
    minutes = reach["train_seconds"] / 60 if reach["train_seconds"] is not None else None
    caveat = ""
    if summary.get("conclusion", {}).get("verdict") == "inconclusive":
        caveat = " Like the comparison above, this is inside the noise: not a conclusion."
    return (
        f"TREAD reaches the dense arm's final {label} of {target:.2f} after "
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
