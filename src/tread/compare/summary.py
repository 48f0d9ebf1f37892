"""Reading both arms back: curves, the seed-noise band, the figures and the conclusion."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..config import Config, load_config
from ..routing import describe_routes
from ..visual import read_metrics
from .plan import ARMS, MIN_EVAL_POINTS, MIN_RATE_ROWS, MIN_STEPS, SEED_STRIDE


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
    run: Path, count: int, *, device: torch.device | str = "cpu", progress: bool = False
) -> dict[str, Any]:
    """FD and accuracy of a run's newest checkpoint (EMA) at ``count`` sample seeds.

    The base seed's result is taken from the run's in-loop evaluation of the same step when
    there is one (same weights, seeds and labels: the same number), so it is not computed twice.

    Returns:
        {"step", "seeds", "fd", "acc"} with one entry per seed.
    """
    from ..train import load_for_inference
    from ..train.evaluation import evaluate_model, feature_net_for, reference_for

    device = torch.device(device)
    model, config, step = load_for_inference(run, device)
    seeds = noise_seeds(config.sample.seed, count, config.eval.num_samples)
    known = {}
    for row in read_metrics(run / "metrics.jsonl"):
        if (
            row.get("step") == step
            and is_finite_number(row.get("eval/fd"))
            and is_finite_number(row.get("eval/acc"))
        ):
            known[config.sample.seed] = (float(row["eval/fd"]), float(row["eval/acc"]))
    net = reference = None
    fd, acc = [], []
    for seed in seeds:
        if seed not in known:
            if net is None:
                net = feature_net_for(config, device=device)
                reference = reference_for(config, net, None, run / "eval", device)
            result = evaluate_model(
                model,
                config,
                num_samples=config.eval.num_samples,
                metrics=("fd", "acc"),
                net=net,
                reference_stats=reference,
                seed=seed,
                device=device,
                progress=progress,
            )
            known[seed] = (float(result["fd"]), float(result["acc"]))
        fd.append(known[seed][0])
        acc.append(known[seed][1])
    return {"step": step, "seeds": seeds, "fd": fd, "acc": acc}


def _band(seed_fd: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mean and half-range of the finite FDs of a seed evaluation; None without two of them."""
    fds = [x for x in (seed_fd or {}).get("fd", []) if is_finite_number(x)]
    if len(fds) < 2:
        return None
    return {
        **seed_fd,
        "fd_mean": statistics.fmean(fds),
        "fd_half_range": (max(fds) - min(fds)) / 2,
        "fd_min": min(fds),
        "fd_max": max(fds),
    }


def arm_summary(run: Path, seed_fd: dict[str, Any] | None = None) -> dict[str, Any]:
    """One arm's numbers from its metrics.jsonl (and its final model's seed evaluation)."""
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    # The first logged interval holds warm-up (allocator, caches): not the training speed.
    rates = [float(r["it_s"]) for r in train_rows[1:] if is_finite_number(r.get("it_s"))]
    fd_steps = eval_points(run, "fd", "step")
    acc = eval_points(run, "acc", "step")
    return {
        # The last row of any kind: a final evaluation may follow the last logged step.
        "steps": max((int(r["step"]) for r in rows if "step" in r), default=0),
        "train_minutes": max((float(r.get("train_s", 0.0)) for r in rows), default=0.0) / 60,
        "median_it_s": statistics.median(rates) if len(rates) >= MIN_RATE_ROWS else None,
        "rate_rows": len(rates),
        "eval_points": len(fd_steps),
        "final_fd": fd_steps[-1][1] if fd_steps else None,
        "best_fd": min(y for _, y in fd_steps) if fd_steps else None,
        "final_acc": acc[-1][1] if acc else None,
        "final_fd_seeds": _band(seed_fd),
        "fd_vs_time": eval_points(run, "fd", "train_s"),
        "fd_vs_steps": fd_steps,
        "acc_vs_steps": acc,
    }


def summarize(
    runs: dict[str, Path],
    *,
    budget: str,
    seed_fd: dict[str, dict[str, Any]] | None = None,
    eval_note: str | None = None,
) -> dict[str, Any]:
    """Every number of a comparison; JSON-ready (None where a figure cannot be computed).

    Args:
        runs: run directory per arm (``dense``, ``tread``), each with metrics.jsonl and the
            resolved config.yaml the training saved.
        budget: the budget in words, e.g. "5 min of training per arm".
        seed_fd: per arm, :func:`evaluate_final_seeds` output (the seed-noise band).
        eval_note: how the evaluation interval was chosen.
    """
    config = load_config(runs["tread"] / "config.yaml")  # as trained: real sample count etc.
    summary: dict[str, Any] = {
        "budget": budget,
        "routes": describe_routes(config.routes(), config.depth()),
        "eval": {
            "every": config.eval.every,
            "chosen": eval_note,
            "num_samples": config.eval.num_samples,
            "feature_net": config.eval.feature_net or config.data.name,
            "sampler": config.sample.sampler,
            "sample_steps": config.sample.steps,
            "seed": config.sample.seed,
        },
    }
    for name, run in runs.items():
        summary[name] = arm_summary(run, (seed_fd or {}).get(name))
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
    if dense["final_fd"] is not None and tread["fd_vs_steps"]:
        target = dense["final_fd"]
        reach_t = time_to_reach(tread["fd_vs_time"], target)
        reach_s = time_to_reach(tread["fd_vs_steps"], target)
        dense_t = dense["fd_vs_time"][-1][0] if dense["fd_vs_time"] else None
        summary["tread_reaches_dense_final_fd"] = {
            "target_fd": target,
            "train_seconds": reach_t,
            "steps": reach_s,
            "wallclock_to_quality_ratio": dense_t / reach_t if dense_t and reach_t else None,
            "steps_to_quality_ratio": dense["fd_vs_steps"][-1][0] / reach_s if reach_s else None,
        }
    summary["conclusion"] = conclude(summary)
    return json_safe(summary)


def conclude(summary: dict[str, Any]) -> dict[str, str]:
    """Which arm ends with the lower FD, or "inconclusive" (too short, or inside the band).

    Returns:
        {"verdict": "dense" | "tread" | "inconclusive", "text": one or two sentences}.
    """
    arms = {name: summary[name] for name in ARMS}
    bands = {name: arm["final_fd_seeds"] for name, arm in arms.items()}
    if all(bands.values()):
        band = (
            f"Final FD over {len(bands['dense']['fd'])} / {len(bands['tread']['fd'])} sample "
            f"seeds (mean ± half-range): dense {plus_minus(bands['dense'])}, "
            f"TREAD {plus_minus(bands['tread'])}."
        )
    else:
        band = (
            f"Final FD at one sample seed: dense {fmt(arms['dense']['final_fd'], '.2f')}, TREAD "
            f"{fmt(arms['tread']['final_fd'], '.2f')}; no seed-noise band (fewer than 2 seeds)."
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
        bands["dense"]["fd_max"] < bands["tread"]["fd_min"]
        or bands["tread"]["fd_max"] < bands["dense"]["fd_min"]
    ):
        gap = abs(bands["dense"]["fd_mean"] - bands["tread"]["fd_mean"])
        reason = f"the final FD gap ({gap:.2f}) is inside the seed-noise band: the ranges overlap"
    else:
        winner = "tread" if bands["tread"]["fd_mean"] < bands["dense"]["fd_mean"] else "dense"
        label = "TREAD" if winner == "tread" else "dense"
        text = (
            f"With {summary['budget']}, {label} ends with the lower FD (every seed of one arm "
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


def plus_minus(band: dict[str, Any]) -> str:
    return f"{band['fd_mean']:.2f} ± {band['fd_half_range']:.2f}"


def fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; "–" for a missing or non-finite one."""
    return format(value, spec) if is_finite_number(value) else "–"
