"""``tread compare`` and ``tread bench``: numbers from synthetic metrics checked against values
computed by hand, plus one tiny end-to-end comparison."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import runpy
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from tread import Route
from tread.bench import benchmark_step, format_table
from tread.cli import main as cli_main
from tread.compare import (
    METRIC_LABELS,
    choose_eval_every,
    choose_log_every,
    conclude,
    evaluate_final_seeds,
    expected_steps,
    noise_seeds,
    plan_intervals,
    probe_step_rate,
    summarize,
    time_to_reach,
    write_outputs,
    write_report,
)
from tread.config import config_to_yaml, load_config
from tread.train.latent_eval import LatentEvalKind

from conftest import TINY_MODEL

TINY = TINY_MODEL
SHAPE = ["model.input_size=8", "model.in_channels=1", "model.num_classes=10"]  # as resolved
ROOT = Path(__file__).resolve().parents[1]


def strict_json(text: str):
    """json.loads that fails on NaN / Infinity (which json.dumps writes by default)."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def make_run(
    path: Path,
    *,
    rates: list[float],
    evals: list[tuple[int, float, float, float]],
    overrides: tuple[str, ...] = (),
    log_every: int = 100,
    metric: str = "fd",
) -> Path:
    """A run directory as training leaves it: config.yaml and metrics.jsonl.

    Args:
        rates: it/s of each logged training row (rows at log_every, 2 log_every, ...).
        evals: (step, train_s, fd, acc) evaluation rows.
        metric: the logged metric: "fd" (with "acc"), or a latent run's (no "acc").
    """
    path.mkdir(parents=True)
    config = load_config("digits_tread", [*TINY, *SHAPE, *overrides])
    (path / "config.yaml").write_text(config_to_yaml(config))
    rows = [
        {"step": (i + 1) * log_every, "loss": 0.5, "it_s": r, "train_s": (i + 1) * 10.0}
        for i, r in enumerate(rates)
    ]
    rows += [
        {
            "step": s,
            f"eval/{metric}": fd,
            **({"eval/acc": acc} if metric == "fd" else {}),
            "train_s": t,
            "elapsed_s": t + 1,
        }
        for s, t, fd, acc in evals
    ]
    rows.sort(key=lambda r: r["step"])
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_runs(tmp_path: Path, **tread_options) -> dict[str, Path]:
    dense = make_run(
        tmp_path / "dense",
        rates=[50.0, 2.0, 4.0, 3.0],  # first row (warm-up) ignored: median of 2, 4, 3 = 3
        evals=[(100, 60.0, 80.0, 0.5), (200, 120.0, 40.0, 0.7)],
        overrides=("model.routes=[]",),  # summarize reads the TREAD arm's config only
        metric=tread_options.get("metric", "fd"),
    )
    tread = make_run(
        tmp_path / "tread",
        rates=tread_options.pop("rates", [50.0, 5.0, 7.0, 6.0]),  # median 6
        evals=[(100, 40.0, 60.0, 0.6), (200, 80.0, 30.0, 0.8)],
        **tread_options,
    )
    return {"dense": dense, "tread": tread}


def test_time_to_reach_interpolates():
    points = [(10.0, 100.0), (20.0, 50.0), (30.0, 20.0)]
    assert time_to_reach(points, 100.0) == 10.0
    assert time_to_reach(points, 35.0) == pytest.approx(25.0)
    assert time_to_reach(points, 10.0) is None


def test_summary_numbers_match_hand_computed_values(tmp_path):
    summary = summarize(two_runs(tmp_path), budget="200 steps per arm")
    dense, tread = summary["dense"], summary["tread"]
    assert dense["median_it_s"] == 3.0 and tread["median_it_s"] == 6.0
    assert dense["final_fd"] == 40.0 and dense["best_fd"] == 40.0 and dense["final_acc"] == 0.7
    assert dense["train_minutes"] == pytest.approx(2.0)  # last train_s: 120 s
    assert dense["eval_points"] == 2 and dense["steps"] == 400
    speed = summary["training_step_speedup"]
    assert speed["measured_it_s_ratio"] == 2.0
    # One routed block of three at ratio 0.5: saves less than half a block's FLOPs plus the
    # attention's quadratic share, so the ideal is above 1 and below 3 / (3 - 0.75).
    assert 1.0 < speed["ideal_flop_ratio"] < 3 / 2.25
    assert speed["fraction_of_ideal"] == pytest.approx(2.0 / speed["ideal_flop_ratio"])
    # TREAD crosses dense's final FD (40) between (100, 60) and (200, 30): 2/3 of the way.
    reach = summary["tread_reaches_dense_final_fd"]
    assert reach["target_fd"] == 40.0
    assert reach["steps"] == pytest.approx(100 + 100 * 2 / 3)
    assert reach["train_seconds"] == pytest.approx(40 + 40 * 2 / 3)
    assert reach["steps_to_quality_ratio"] == pytest.approx(200 / (500 / 3))  # 1.2
    assert reach["wallclock_to_quality_ratio"] == pytest.approx(120 / (200 / 3))  # 1.8


def test_too_few_rows_and_nan_metrics_give_no_nan_anywhere(tmp_path):
    # One logged row, as a 10-step run with log_every=25 leaves: nothing after the warm-up row.
    runs = two_runs(tmp_path, rates=[50.0])
    with (runs["tread"] / "metrics.jsonl").open("a") as f:  # a diverged evaluation
        f.write(json.dumps({"step": 300, "eval/fd": float("nan"), "train_s": 90.0}) + "\n")
    summary = summarize(runs, budget="300 steps per arm")
    assert summary["tread"]["median_it_s"] is None
    speed = summary["training_step_speedup"]
    assert speed["measured_it_s_ratio"] is None and speed["fraction_of_ideal"] is None
    assert "too few logged training rows" in speed["note"]
    assert summary["tread"]["final_fd"] == 30.0  # the NaN row is not a point of the curve
    strict_json(json.dumps(summary, allow_nan=False))
    report = write_report(tmp_path, summary, "tiny").read_text()
    assert "nan" not in report.lower()
    assert "not measured, too few logged training rows" in report
    assert "| tread | 300 | 1.5 | – |" in report


def test_report_names_two_figures_apart_and_states_real_sample_count(tmp_path):
    runs = two_runs(tmp_path, overrides=("eval.num_samples=200",))
    summary = summarize(runs, budget="200 steps per arm")
    assert summary["eval"]["num_samples"] == 200
    report = write_report(tmp_path, summary, "tiny").read_text()
    assert "over 200 EMA samples" in report
    assert "Training-step speed-up (it/s ratio" in report
    assert "steps-to-quality ratio 1.20x" in report
    assert "wall-clock-to-quality ratio 1.80x" in report
    assert "inside the noise: not a conclusion" in report  # 2 evaluations: inconclusive
    # "step speed-up" only ever as part of "training-step speed-up"
    assert not re.search(r"(?<!training-)step speed-up", report, re.IGNORECASE)
    assert not any("step_speedup" in key for key in summary if key != "training_step_speedup")


def band(fds: list[float]) -> dict:
    return {
        "fd": fds,
        "fd_mean": sum(fds) / len(fds),
        "fd_half_range": (max(fds) - min(fds)) / 2,
        "fd_min": min(fds),
        "fd_max": max(fds),
    }


def arms(dense_fds, tread_fds, *, points=6, steps=1000) -> dict:
    def arm(fds):
        seeds = band(fds) if len(fds) > 1 else None
        return {"eval_points": points, "steps": steps, "final_fd": fds[0], "final_fd_seeds": seeds}

    return {"budget": "5 min of training per arm", "dense": arm(dense_fds), "tread": arm(tread_fds)}


@pytest.mark.parametrize(
    ("summary", "verdict", "words"),
    [
        (arms([20.0, 21.0, 22.0], [17.0, 18.0, 19.0]), "tread", "TREAD ends with the lower FD"),
        (arms([17.0, 18.0, 19.0], [20.0, 21.0, 22.0]), "dense", "dense ends with the lower FD"),
        (arms([18.0, 19.0, 20.0], [17.5, 18.5, 19.5]), "inconclusive", "inside the seed-noise"),
        (arms([20.0, 21.0, 22.0], [10.0, 11.0, 12.0], steps=100), "inconclusive", "too short"),
        (arms([20.0, 21.0, 22.0], [10.0, 11.0, 12.0], points=4), "inconclusive", "too short"),
        (arms([20.0], [10.0]), "inconclusive", "noise was not measured"),
    ],
)
def test_conclusion_needs_length_and_a_gap_outside_the_band(summary, verdict, words):
    result = conclude(summary)
    assert result["verdict"] == verdict
    assert words in result["text"]
    if summary["dense"]["final_fd_seeds"]:  # the band is stated next to every conclusion
        assert "over 3 / 3 sample seeds (mean ± half-range)" in result["text"]
        assert result["text"].count("± 1.00") == 2


def test_seed_band_in_summary(tmp_path):
    seed_fd = {
        "dense": {
            "step": 200,
            "seeds": [0, 1000, 2000],
            "fd": [40.0, 43.0, 37.0],
            "acc": [0.7] * 3,
        },
        "tread": {
            "step": 200,
            "seeds": [0, 1000, 2000],
            "fd": [30.0, 31.0, 29.0],
            "acc": [0.8] * 3,
        },
    }
    summary = summarize(two_runs(tmp_path), budget="200 steps per arm", seed_fd=seed_fd)
    dense = summary["dense"]["final_fd_seeds"]
    assert (dense["fd_mean"], dense["fd_half_range"]) == (40.0, 3.0)
    assert summary["conclusion"]["verdict"] == "inconclusive"  # 2 evaluations, 200 steps
    assert "dense 40.00 ± 3.00, TREAD 30.00 ± 1.00" in summary["conclusion"]["text"]


def test_noise_seeds_do_not_share_per_sample_seeds():
    assert noise_seeds(0, 3, 500) == [0, 1000, 2000]
    assert noise_seeds(7, 2, 1500) == [7, 2007]  # samples 7..1506 and 2007..3506


@pytest.mark.parametrize(("steps", "every"), [(20, 4), (12, 2), (1000, 200), (3, 1)])
def test_eval_interval_gives_five_points(steps, every):
    assert choose_eval_every(steps) == every
    assert steps // every >= min(5, steps)


def test_interval_from_a_probed_rate():
    # 2.5 it/s for the slower arm, 5 min, 0.8 margin: 600 steps -> every 120, rows every 25 / 5.
    assert expected_steps({"dense": 2.5, "tread": 3.0}, 5.0) == 600
    assert choose_eval_every(600) == 120
    assert choose_log_every(25, 600) == 25 and choose_log_every(25, 100) == 5
    assert choose_log_every(25, 10) == 1


def test_plan_intervals_for_each_budget(monkeypatch):
    config = load_config("digits_tread", [*TINY, *SHAPE, "train.steps=20", "train.log_every=25"])
    resolved = {"dense": config, "tread": config}
    plan = plan_intervals(resolved, minutes=None, eval_every=None)
    assert (plan.eval_every, plan.log_every, plan.rates) == (4, 1, None)  # 20 // 5, 20 // 20
    assert plan_intervals(resolved, minutes=None, eval_every=7).note == "--eval-every"
    probed = {"dense": 2.5, "tread": 3.0}
    named = {name: dataclasses.replace(config, preset=name) for name in probed}
    monkeypatch.setattr("tread.compare.plan.probe_step_rate", lambda c, device: probed[c.preset])
    plan = plan_intervals(named, minutes=5.0, eval_every=None)
    assert (plan.expected_steps, plan.eval_every, plan.log_every) == (600, 120, 25)
    assert plan.rates == probed


def test_probe_step_rate_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("digits_tread", [*TINY, *SHAPE, "train.batch_size=4"])
    assert probe_step_rate(config, steps=2) > 0
    assert list(tmp_path.iterdir()) == []


def test_depth_from_the_registry_when_the_preset_leaves_it_unset(tmp_path):
    config = load_config("digits_tread", ["model.depth=null"])  # DiT-S/2: depth 12
    assert config.depth() == 12
    runs = two_runs(tmp_path, overrides=("model.depth=null", "model.routes.0.end=-4"))
    assert summarize(runs, budget="x")["routes"] == "r(1→8, 0.5)"


def test_compare_json_is_written_before_the_plots(tmp_path, monkeypatch):
    summary = summarize(two_runs(tmp_path), budget="200 steps per arm")

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr("tread.compare.report.plot_fd", broken_plot)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_outputs(out, summary, "tiny")
    saved = strict_json((out / "compare.json").read_text())
    assert saved["training_step_speedup"]["measured_it_s_ratio"] == 2.0
    assert (out / "report.md").is_file()


def test_compare_end_to_end_short_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    tiny = [*TINY, "train.batch_size=16", "sample.steps=4", "sample.grid_size=10"]
    args = ["--steps", "12", "--eval-samples", "40", "--noise-seeds", "2", "--out", str(out)]
    assert cli_main(["compare", "digits_tread", *tiny, *args]) == 0
    printed = capsys.readouterr().out
    assert "evaluation every 2 steps" in printed  # 12 // 5, no --eval-every
    for name in ("report.md", "fd.png", "acc_vs_steps.png", "samples_side_by_side.png"):
        assert (out / name).is_file(), name
    summary = strict_json((out / "compare.json").read_text())
    for arm in ("dense", "tread"):
        assert summary[arm]["steps"] == 12
        assert [s for s, _ in summary[arm]["fd_vs_steps"]] == [2, 4, 6, 8, 10, 12]
        seeds = summary[arm]["final_fd_seeds"]
        assert seeds["seeds"] == [0, 1000] and len(seeds["fd"]) == 2
        # Seed 0 is the in-loop evaluation of the final step (same model, seeds and labels).
        assert seeds["fd"][0] == summary[arm]["final_fd"]
        assert all(math.isfinite(x) for x in seeds["fd"])
        assert seeds["fd"][0] != seeds["fd"][1]  # other seeds, other samples
    assert summary["eval"]["num_samples"] == 40
    assert summary["conclusion"]["verdict"] == "inconclusive"
    report = (out / "report.md").read_text()
    assert "over 40 EMA samples" in report and "too short" in report
    assert "routes: []" in (out / "dense" / "config.yaml").read_text()

    # The reused seed-0 number is what scoring the final checkpoint again gives.
    import torch

    from tread.train import load_for_inference
    from tread.train.evaluation import evaluate_model, feature_net_for, reference_for

    model, config, step = load_for_inference(out / "tread", "cpu")
    net = feature_net_for(config)
    reference = reference_for(config, net, None, out / "tread" / "eval", torch.device("cpu"))
    again = evaluate_model(
        model, config, num_samples=40, metrics=("fd",), net=net, reference_stats=reference, seed=0
    )
    assert step == 12
    assert again["fd"] == pytest.approx(summary["tread"]["final_fd_seeds"]["fd"][0], rel=1e-5)


def test_compare_refuses_a_config_without_routes(capsys):
    assert cli_main(["compare", "digits_dit", "--steps", "1"]) == 2
    assert "model.routes" in capsys.readouterr().err


def test_bench_reports_both_arms_and_ideal():
    result = benchmark_step(
        "DiT-S/8",
        [Route(1, 2, 0.5)],
        input_size=16,
        batch=2,
        warmup=1,
        repeats=2,
        steps_per_repeat=1,
    )
    assert result.tokens == 4 and len(result.dense.step_seconds) == 2
    assert result.ideal_speedup > 1
    assert result.fraction_of_ideal == pytest.approx(result.speedup / result.ideal_speedup)
    assert "DiT-S/8" in format_table([result])


# --- latent runs: the run's own metric ("fd_latent" or "fid"), no accuracy ----------------------

LATENT_RUNS = {
    # metric: (overrides of the TREAD arm's config, words the report must use)
    "fd_latent": (("data.name=latents", "model.in_channels=4"), "FD (pooled latents) ="),
    "fid": (
        (
            "data.name=latents",
            "model.in_channels=4",
            "eval.feature_net=inception",
            "eval.reference_split=/refs/VIRTUAL_imagenet256_labeled.npz",
        ),
        "FID = Fréchet distance in Inception-v3 features",
    ),
}


def keys_of(value) -> set[str]:
    """Every dict key in a nested JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


def test_metric_labels_name_every_metric_a_run_logs():
    assert set(METRIC_LABELS) == {"fd", *get_args(LatentEvalKind)}


@pytest.mark.parametrize("metric", sorted(LATENT_RUNS))
def test_latent_summary_is_keyed_by_its_metric_and_has_no_accuracy(tmp_path, metric):
    overrides, words = LATENT_RUNS[metric]
    runs = two_runs(tmp_path, overrides=overrides, metric=metric)
    seeds = {
        arm: {"step": 200, "seeds": [0, 1000], metric: fds}
        for arm, fds in (("dense", [40.0, 42.0]), ("tread", [30.0, 31.0]))
    }
    summary = summarize(runs, budget="200 steps per arm", seed_fd=seeds)
    assert summary["eval"]["metric"] == metric
    assert summary["eval"]["metric_label"] == METRIC_LABELS[metric]
    if metric == "fd_latent":  # the latent features, not a dataset's classifier
        assert summary["eval"]["feature_net"] == "latent_avgpool8x8"
    keys = keys_of(summary)
    assert not any("acc" in key for key in keys)
    assert not {"final_fd", "fd_vs_steps", "fd"} & keys  # "fd" keys mean the classifier FD
    dense = summary["dense"]
    assert dense[f"final_{metric}"] == 40.0
    assert dense[f"{metric}_vs_steps"] == [[100, 80.0], [200, 40.0]]
    assert dense[f"final_{metric}_seeds"][f"{metric}_half_range"] == 1.0
    reach = summary[f"tread_reaches_dense_final_{metric}"]  # as for pixels: 2/3 of the way
    assert reach[f"target_{metric}"] == 40.0 and reach["steps"] == pytest.approx(500 / 3)
    assert f"{METRIC_LABELS[metric]} over 2 / 2 sample seeds" in summary["conclusion"]["text"]

    out = tmp_path / "out"
    report = write_outputs(out, summary, "tiny").read_text()
    strict_json((out / "compare.json").read_text())
    assert words in report and "No accuracy for latent runs" in report
    assert f"| final {METRIC_LABELS[metric]} | best {METRIC_LABELS[metric]} | final " in report
    assert "nan" not in report.lower() and "acc_vs_steps" not in report and "(fd.png)" not in report
    assert (out / f"{metric}.png").is_file()
    assert not (out / "acc_vs_steps.png").exists() and not (out / "fd.png").exists()


def write_latent_shards(path: Path, *, channels: int = 4, size: int = 8) -> Path:
    """64 random latents of 10 classes, as scripts/random_latents.py writes them."""
    write = runpy.run_path(str(ROOT / "scripts" / "random_latents.py"))["write_random_latents"]
    write(path, 64, classes=10, channels=channels, size=size)
    return path


# digits_tread on latents: the tiny model, fd_latent against the training latents.
LATENT_COMPARE = [
    *TINY,
    "data.name=latents",
    "eval.reference_split=train",
    "train.batch_size=8",
    "sample.steps=2",
    "sample.grid_size=2",
]


def test_latent_compare_end_to_end_scores_fd_latent(tmp_path, capsys):
    data = write_latent_shards(tmp_path / "latents")
    out = tmp_path / "cmp"
    args = ["--steps", "6", "--eval-samples", "8", "--noise-seeds", "2", "--out", str(out)]
    config = [*LATENT_COMPARE, f"data.path={data}"]
    assert cli_main(["compare", "digits_tread", *config, *args]) == 0
    printed = capsys.readouterr().out
    assert "final FD (pooled latents)" in printed and "acc" not in printed
    for name in ("report.md", "fd_latent.png", "samples_side_by_side.png"):
        assert (out / name).is_file(), name
    assert not (out / "acc_vs_steps.png").exists()
    summary = strict_json((out / "compare.json").read_text())
    assert summary["eval"]["metric"] == "fd_latent"
    assert not any("acc" in key for key in keys_of(summary))
    for arm in ("dense", "tread"):
        s = summary[arm]
        assert s["steps"] == 6 and [x for x, _ in s["fd_latent_vs_steps"]] == [1, 2, 3, 4, 5, 6]
        band = s["final_fd_latent_seeds"]
        assert band["seeds"] == [0, 1000] and all(math.isfinite(x) for x in band["fd_latent"])
        assert band["fd_latent"][0] != band["fd_latent"][1]  # other seeds, other samples
        # The base seed is the in-loop evaluation of the final step.
        rows = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
        in_loop = [r["eval/fd_latent"] for r in rows if r["step"] == 6 and "eval/fd_latent" in r]
        assert band["fd_latent"][0] == s["final_fd_latent"] == in_loop[-1]
    report = (out / "report.md").read_text()
    assert "FD (pooled latents) = " in report and "No accuracy for latent runs" in report

    # Scored again without the in-loop row and the cached reference, the final-seed scorer
    # gives the in-loop number: same scorer, same reference, same features.
    again = tmp_path / "again"
    shutil.copytree(out / "tread", again)
    shutil.rmtree(again / "eval")
    rows = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in rows if not (r["step"] == 6 and "eval/fd_latent" in r)]
    (again / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    scored = evaluate_final_seeds(again, 1)
    assert set(scored) == {"step", "seeds", "fd_latent"} and scored["step"] == 6
    assert scored["fd_latent"][0] == pytest.approx(in_loop[-1], rel=1e-9)
    assert (again / "eval" / "ref_latents_train_latent.npz").is_file()  # cached in the run


class _StandInInception(torch.nn.Module):
    """Stands in for the FID Inception (no weights offline): per-channel mean and std."""

    name = "inception_v3_fid"
    input_size = (3, 299, 299)

    def forward(self, images):
        pool = torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)  # (B, 3, H, W) -> (B, 6)
        return {"pool": pool, "logits": None, "spatial": None}


def test_latent_fid_compare_scores_decoded_samples_by_fid(tmp_path, monkeypatch, capsys, vae_dir):
    import tread.eval

    monkeypatch.setattr(tread.eval, "load_inception", lambda *a, **k: _StandInInception())
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setenv("TREAD_INCEPTION_WEIGHTS", str(weights))
    monkeypatch.delenv("TREAD_VAE", raising=False)
    adm = tmp_path / "ref_batch.npz"
    pixels = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(adm, arr_0=pixels)
    data = write_latent_shards(tmp_path / "latents", size=4)  # the tiny VAE: 4x4 -> 32x32
    config = [
        *LATENT_COMPARE,
        f"data.path={data}",
        "eval.feature_net=inception",
        f"eval.reference_split={adm}",
        f"eval.vae={vae_dir}",
    ]
    out = tmp_path / "cmp"
    args = ["--steps", "2", "--eval-samples", "8", "--noise-seeds", "2", "--out", str(out)]
    assert cli_main(["compare", "digits_tread", *config, *args]) == 0
    assert "final FID" in capsys.readouterr().out
    summary = strict_json((out / "compare.json").read_text())
    assert (summary["eval"]["metric"], summary["eval"]["feature_net"]) == ("fid", "inception")
    assert not any("acc" in key for key in keys_of(summary))
    for arm in ("dense", "tread"):
        band = summary[arm]["final_fid_seeds"]
        assert band["seeds"] == [0, 1000] and all(math.isfinite(x) for x in band["fid"])
        assert band["fid"][0] == summary[arm]["final_fid"]  # the in-loop value of the last step
        assert band["fid"][0] != band["fid"][1]  # other seeds, other samples
    assert (out / "fid.png").is_file() and not (out / "acc_vs_steps.png").exists()
    assert "FID = Fréchet distance in Inception-v3 features" in (out / "report.md").read_text()


# Latent FID compares whose final (and in-loop) scoring cannot work: refused before training.
FID_SETTINGS = {
    # case: (latent channels, eval.vae set?, Inception weights set?, message part)
    "vae_of_other_channels": (3, True, True, "4 latent channels but the model generates 3"),
    "no_vae": (4, False, True, "set eval.vae"),
    "no_inception_weights": (4, True, False, "Inception weights not given"),
}


@pytest.mark.parametrize("case", sorted(FID_SETTINGS))
def test_latent_compare_fails_before_training_when_scoring_would_fail(
    tmp_path, monkeypatch, capsys, vae_dir, case
):
    channels, with_vae, with_weights, message = FID_SETTINGS[case]
    data = write_latent_shards(tmp_path / "latents", channels=channels)
    adm = tmp_path / "ref_batch.npz"
    np.savez(adm, arr_0=np.zeros((12, 32, 32, 3), dtype=np.uint8))
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"stand-in")  # checked for existence only: nothing is loaded
    monkeypatch.delenv("TREAD_VAE", raising=False)
    if with_weights:
        monkeypatch.setenv("TREAD_INCEPTION_WEIGHTS", str(weights))
    else:
        monkeypatch.delenv("TREAD_INCEPTION_WEIGHTS", raising=False)
    config = [
        *LATENT_COMPARE,
        f"data.path={data}",
        "eval.feature_net=inception",
        f"eval.reference_split={adm}",
        *([f"eval.vae={vae_dir}"] if with_vae else []),
    ]
    out = tmp_path / "cmp"
    assert cli_main(["compare", "digits_tread", *config, "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tread compare: error: "), err
    assert message in err
    assert not out.exists()  # no run directory, no checkpoint: nothing trained
