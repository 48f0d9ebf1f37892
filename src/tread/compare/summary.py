"""Reading both arms back: curves, the seed-noise band, the figures and the conclusion."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..config import Config, load_config
from ..routing import describe_routes
from ..visual import read_metrics
from .plan import ARMS, MIN_EVAL_POINTS, MIN_RATE_ROWS, MIN_STEPS, SEED_STRIDE

# The metric a comparison is keyed by (its name in metrics.jsonl and compare.json) in words: a
# pixel run's FD in a packaged classifier's features, a latent run's FD of pooled latents (not
# FID, not a classifier FD) or FID of its VAE-decoded samples.
METRIC_LABELS = {"fd": "FD", "fd_latent": "FD (pooled latents)", "fid": "FID"}


def eval_points(run_dir: Path, key: str, x: str) -> list[tuple[float, float]]:
    """(x, metric) pairs of a run's evaluation rows; x is 'step' or 'train_s'.

    A non-finite metric (a diverged model) is not a point of the curve and is left out.
    """
    rows = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if is_finite_number(r.get(f"eval/{key}"))
    ]
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


def noise_seeds(base: int, count: int, num_samples: int) -> list[int]:
    """``count`` sample seeds whose per-sample seeds (seed + i, i < num_samples) are disjoint."""
    stride = SEED_STRIDE * math.ceil(num_samples / SEED_STRIDE)
    return [base + k * stride for k in range(count)]


def evaluate_final_seeds(
    run: Path,
    count: int,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    inception_weights: str | Path | None = None,
    vae: str | Path | None = None,
) -> dict[str, Any]:
    """The run's own metrics of its newest checkpoint (EMA) at ``count`` sample seeds.

    Scored by the in-loop evaluation's scorer (:func:`tread.train.evaluation.make_scorer`: same
    feature net or latent features, same cached reference in ``run/eval``), so the base seed's
    result is the in-loop row of the same step; it is taken from there when there is one (same
    weights, seeds and labels: the same number), not computed twice.

    Args:
        run: the run directory.
        count: sample seeds (see :func:`noise_seeds`).
        device: where to generate and score.
        progress: show a sampling progress bar.
        inception_weights: pytorch-fid weights file (eval.feature_net=inception).
        vae: the VAE folder of a latent run's FID when ``eval.vae`` is unset.

    Returns:
        {"step", "seeds", then one list per metric of
        :func:`tread.train.latent_eval.eval_metrics`}: "fd", "acc" for a pixel run,
        "fd_latent" or "fid" for a latent run; one entry per seed.

    Raises:
        ConfigError / DataError: the scorer's settings (checked before any sample is drawn).
    """
    from ..train import load_for_inference
    from ..train.evaluation import make_scorer
    from ..train.latent_eval import eval_metrics

    device = torch.device(device)
    model, config, step = load_for_inference(run, device)
    # The run's own directory: its cached reference is the one the in-loop scorer used.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, run_dir=str(run)))
    metrics = eval_metrics(config)
    seeds = noise_seeds(config.sample.seed, count, config.eval.num_samples)
    known = {}
    for row in read_metrics(run / "metrics.jsonl"):
        if row.get("step") == step and all(is_finite_number(row.get(f"eval/{m}")) for m in metrics):
            known[config.sample.seed] = tuple(float(row[f"eval/{m}"]) for m in metrics)
    score = None
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for seed in seeds:
        if seed not in known:
            if score is None:
                score = make_scorer(
                    config,
                    device=device,
                    progress=progress,
                    inception_weights=inception_weights,
                    vae=vae,
                )
            result = score(model, config, seed=seed)
            known[seed] = tuple(float(result[m]) for m in metrics)
        for m, value in zip(metrics, known[seed], strict=True):
            values[m].append(value)
    return {"step": step, "seeds": seeds, **values}


def _band(seed_scores: dict[str, Any] | None, metric: str = "fd") -> dict[str, Any] | None:
    """Mean and half-range of the finite values of ``metric`` over seeds; None without two."""
    values = [x for x in (seed_scores or {}).get(metric, []) if is_finite_number(x)]
    if len(values) < 2:
        return None
    return {
        **seed_scores,
        f"{metric}_mean": statistics.fmean(values),
        f"{metric}_half_range": (max(values) - min(values)) / 2,
        f"{metric}_min": min(values),
        f"{metric}_max": max(values),
    }


def arm_summary(
    run: Path,
    seed_fd: dict[str, Any] | None = None,
    *,
    metrics: tuple[str, ...] = ("fd", "acc"),
) -> dict[str, Any]:
    """One arm's numbers from its metrics.jsonl (and its final model's seed evaluation).

    Args:
        run: the run directory.
        seed_fd: :func:`evaluate_final_seeds` output for the run, if any.
        metrics: the run's metrics, main one first (:func:`tread.train.latent_eval.eval_metrics`);
            the main one ``m`` names the keys ``final_m``, ``best_m``, ``final_m_seeds``,
            ``m_vs_time``, ``m_vs_steps``; ``final_acc`` and ``acc_vs_steps`` only with "acc".
    """
    metric = metrics[0]
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    # The first logged interval holds warm-up (allocator, caches): not the training speed.
    rates = [float(r["it_s"]) for r in train_rows[1:] if is_finite_number(r.get("it_s"))]
    by_steps = eval_points(run, metric, "step")
    acc = eval_points(run, "acc", "step") if "acc" in metrics else None
    summary: dict[str, Any] = {
        # The last row of any kind: a final evaluation may follow the last logged step.
        "steps": max((int(r["step"]) for r in rows if "step" in r), default=0),
        "train_minutes": max((float(r.get("train_s", 0.0)) for r in rows), default=0.0) / 60,
        "median_it_s": statistics.median(rates) if len(rates) >= MIN_RATE_ROWS else None,
        "rate_rows": len(rates),
        "eval_points": len(by_steps),
        f"final_{metric}": by_steps[-1][1] if by_steps else None,
        f"best_{metric}": min(y for _, y in by_steps) if by_steps else None,
    }
    if acc is not None:
        summary["final_acc"] = acc[-1][1] if acc else None
    summary[f"final_{metric}_seeds"] = _band(seed_fd, metric)
    summary[f"{metric}_vs_time"] = eval_points(run, metric, "train_s")
    summary[f"{metric}_vs_steps"] = by_steps
    if acc is not None:
        summary["acc_vs_steps"] = acc
    return summary


def summarize(
    runs: dict[str, Path],
    *,
    budget: str,
    seed_fd: dict[str, dict[str, Any]] | None = None,
    eval_note: str | None = None,
) -> dict[str, Any]:
    """Every number of a comparison (compare.json); JSON-ready (None where a figure cannot be
    computed, never NaN).

    The keys follow the metric ``m`` the runs log (:func:`tread.train.latent_eval.eval_metrics`):
    a pixel run's ``m`` is "fd" (FD in a packaged classifier's features) with accuracy; a latent
    run's is "fd_latent" (FD of pooled latents) or "fid" (FID of VAE-decoded samples), with no
    accuracy. Per arm: ``final_m``, ``best_m``, ``final_m_seeds`` (with ``m``, ``m_mean``,
    ``m_half_range``, ``m_min``, ``m_max``), ``m_vs_time``, ``m_vs_steps``, plus ``final_acc`` and
    ``acc_vs_steps`` for pixel runs only; ``tread_reaches_dense_final_m`` (with ``target_m``).
    Pixel runs keep exactly the keys they always had; latent runs add ``eval.metric``,
    ``eval.metric_label`` and ``eval.reference``, and ``eval.feature_net`` names the latent
    features (e.g. ``latent_avgpool8x8``) or ``inception``.

    Args:
        runs: run directory per arm (``dense``, ``tread``), each with metrics.jsonl and the
            resolved config.yaml the training saved.
        budget: the budget in words, e.g. "5 min of training per arm".
        seed_fd: per arm, :func:`evaluate_final_seeds` output (the seed-noise band).
        eval_note: how the evaluation interval was chosen.
    """
    from ..train.latent_eval import eval_metrics

    config = load_config(runs["tread"] / "config.yaml")  # as trained: real sample count etc.
    metrics = eval_metrics(config)
    m = metrics[0]
    summary: dict[str, Any] = {
        "budget": budget,
        "routes": describe_routes(config.routes(), config.depth()),
        "eval": _eval_settings(config, eval_note, m),
    }
    for name, run in runs.items():
        summary[name] = arm_summary(run, (seed_fd or {}).get(name), metrics=metrics)
    dense, tread = summary["dense"], summary["tread"]
    ideal = _ideal_speedup(config)
    measured = None
    note = None
    if dense["median_it_s"] and tread["median_it_s"]:
        measured = tread["median_it_s"] / dense["median_it_s"]
    else:
        note = (
            f"too few logged training rows for a median it/s (dense {dense['rate_rows']}, "
            f"TREAD {tread['rate_rows']} after the first; need {MIN_RATE_ROWS})"
        )
    summary["training_step_speedup"] = {
        "measured_it_s_ratio": measured,
        "ideal_flop_ratio": ideal,
        "fraction_of_ideal": measured / ideal if measured is not None else None,
        "note": note,
    }
    if dense[f"final_{m}"] is not None and tread[f"{m}_vs_steps"]:
        target = dense[f"final_{m}"]
        reach_t = time_to_reach(tread[f"{m}_vs_time"], target)
        reach_s = time_to_reach(tread[f"{m}_vs_steps"], target)
        dense_t = dense[f"{m}_vs_time"][-1][0] if dense[f"{m}_vs_time"] else None
        dense_s = dense[f"{m}_vs_steps"][-1][0]
        summary[f"tread_reaches_dense_final_{m}"] = {
            f"target_{m}": target,
            "train_seconds": reach_t,
            "steps": reach_s,
            "wallclock_to_quality_ratio": dense_t / reach_t if dense_t and reach_t else None,
            "steps_to_quality_ratio": dense_s / reach_s if reach_s else None,
        }
    summary["conclusion"] = conclude(summary)
    return json_safe(summary)


def _eval_settings(config: Config, eval_note: str | None, metric: str) -> dict[str, Any]:
    """The evaluation settings of compare.json; a latent run also names its metric."""
    settings: dict[str, Any] = {
        "every": config.eval.every,
        "chosen": eval_note,
        "num_samples": config.eval.num_samples,
        "feature_net": config.eval.feature_net or config.data.name,
        "sampler": config.sample.sampler,
        "sample_steps": config.sample.steps,
        "seed": config.sample.seed,
    }
    if metric == "fd":
        return settings  # a pixel run: the keys compare.json always had
    if metric == "fd_latent":
        from ..eval.latent import latent_feature_name

        shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
        settings["feature_net"] = latent_feature_name(shape)
    settings.update(
        metric=metric, metric_label=METRIC_LABELS[metric], reference=config.eval.reference_split
    )
    return settings


def summary_metric(summary: dict[str, Any]) -> str:
    """The metric a summary is keyed by: ``eval.metric`` of a latent run, else "fd"."""
    return summary.get("eval", {}).get("metric", "fd")


def metric_label(summary: dict[str, Any]) -> str:
    """The summary's metric in words: "FD", "FD (pooled latents)" or "FID"."""
    return METRIC_LABELS[summary_metric(summary)]


def conclude(summary: dict[str, Any]) -> dict[str, str]:
    """Which arm ends with the lower metric, or "inconclusive" (too short, or inside the band).

    Returns:
        {"verdict": "dense" | "tread" | "inconclusive", "text": one or two sentences}.
    """
    m, label = summary_metric(summary), metric_label(summary)
    arms = {name: summary[name] for name in ARMS}
    bands = {name: arm[f"final_{m}_seeds"] for name, arm in arms.items()}
    if all(bands.values()):
        band = (
            f"Final {label} over {len(bands['dense'][m])} / {len(bands['tread'][m])} sample "
            f"seeds (mean ± half-range): dense {plus_minus(bands['dense'], m)}, "
            f"TREAD {plus_minus(bands['tread'], m)}."
        )
    else:
        band = (
            f"Final {label} at one sample seed: dense {fmt(arms['dense'][f'final_{m}'], '.2f')}, "
            f"TREAD {fmt(arms['tread'][f'final_{m}'], '.2f')}; no seed-noise band (fewer than 2 "
            "seeds)."
        )
    points = min(arm["eval_points"] for arm in arms.values())
    steps = min(arm["steps"] for arm in arms.values())
    if points < MIN_EVAL_POINTS or steps < MIN_STEPS:
        reason = (
            f"the run is too short to compare ({points} evaluations and {steps} steps for the "
            f"shorter arm; a conclusion needs {MIN_EVAL_POINTS} and {MIN_STEPS})"
        )
    elif not all(bands.values()):
        reason = "the sampling noise was not measured"
    elif not (
        bands["dense"][f"{m}_max"] < bands["tread"][f"{m}_min"]
        or bands["tread"][f"{m}_max"] < bands["dense"][f"{m}_min"]
    ):
        gap = abs(bands["dense"][f"{m}_mean"] - bands["tread"][f"{m}_mean"])
        reason = (
            f"the final {label} gap ({gap:.2f}) is inside the seed-noise band: the ranges overlap"
        )
    else:
        winner = "tread" if bands["tread"][f"{m}_mean"] < bands["dense"][f"{m}_mean"] else "dense"
        who = "TREAD" if winner == "tread" else "dense"
        text = (
            f"With {summary['budget']}, {who} ends with the lower {label} (every seed of one arm "
            f"beats every seed of the other). {band}"
        )
        return {"verdict": winner, "text": text}
    return {"verdict": "inconclusive", "text": f"Inconclusive: {reason}. {band}"}


def _ideal_speedup(config: Config) -> float:
    """The cost model's dense/routed FLOP ratio for a resolved config (built on meta)."""
    from ..cost import ideal_speedup
    from ..train.builders import build_from_config

    with torch.device("meta"):
        model = build_from_config(config)
    return ideal_speedup(model, config.routes())


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def json_safe(value: Any) -> Any:
    """Tuples to lists and non-finite floats to None, so ``allow_nan=False`` JSON holds."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plus_minus(band: dict[str, Any], metric: str = "fd") -> str:
    """A seed band as "mean ± half-range" of ``metric``."""
    return f"{band[f'{metric}_mean']:.2f} ± {band[f'{metric}_half_range']:.2f}"


def fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; "–" for a missing or non-finite one."""
    return format(value, spec) if is_finite_number(value) else "–"
