"""``tread compare`` and ``tread bench`` on tiny settings: outputs exist and add up."""

from __future__ import annotations

import json

import pytest

from tread import Route
from tread.bench import benchmark_step, format_table
from tread.cli import main as cli_main
from tread.compare import time_to_reach


def test_time_to_reach_interpolates():
    points = [(10.0, 100.0), (20.0, 50.0), (30.0, 20.0)]
    assert time_to_reach(points, 100.0) == 10.0
    assert time_to_reach(points, 35.0) == pytest.approx(25.0)
    assert time_to_reach(points, 10.0) is None


def test_compare_writes_report_plots_and_table(tmp_path, capsys):
    tiny = [
        "model.depth=3",
        "model.width=32",
        "model.heads=2",
        "model.patch_size=2",
        "model.routes=[{start: 1, end: 1, ratio: 0.5}]",
        "train.batch_size=16",
        "train.log_every=5",
        "sample.steps=4",
        "sample.grid_size=10",
    ]
    out = tmp_path / "cmp"
    code = cli_main(
        [
            "compare",
            "digits_tread",
            *tiny,
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--eval-samples",
            "40",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in (
        "report.md",
        "fd_vs_time.png",
        "fd_vs_steps.png",
        "acc_vs_steps.png",
        "samples_side_by_side.png",
        "compare.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "compare.json").read_text())
    for arm in ("dense", "tread"):
        assert summary[arm]["steps"] == 20
        assert [s for s, _ in summary[arm]["fd_vs_steps"]] == [10, 20]
    # Ideal speed-up from the cost model for the tread arm's route on 16 tokens of 3 blocks.
    from tread.cost import forward_flops
    from tread.models.dit import DiTConfig

    cfg = DiTConfig(depth=3, width=32, heads=2, patch_size=2, input_size=8, in_channels=1)
    expected = forward_flops(cfg) / forward_flops(cfg, [Route(1, 1, 0.5)])
    assert summary["step_speedup"]["ideal"] == pytest.approx(expected)
    measured = summary["tread"]["median_it_s"] / summary["dense"]["median_it_s"]
    assert summary["step_speedup"]["measured"] == pytest.approx(measured)
    report = (out / "report.md").read_text()
    assert "x ideal from the cost model" in report
    assert "| dense | 20 |" in report and "| tread | 20 |" in report
    # The dense arm really is dense: its saved config has no routes.
    assert "routes: []" in (out / "dense" / "config.yaml").read_text()


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
