"""Route skip-ratio schedules: the pure schedule, and what a tiny training does with it."""

from __future__ import annotations

import json
import math
from typing import get_args

import pytest
import torch
import yaml

from test_train import tiny_config, weights
from tread.config import RouteConfig
from tread.routing import Route
from tread.routing.schedule import RATIO_SCHEDULES, RatioSchedule, scheduled_ratio
from tread.train import checkpoint as ckpt
from tread.train import train

LINEAR = ("model.routes.0.schedule=linear", "model.routes.0.ratio=0.0")


def rows_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_rows(a, b):
    """The metrics of two runs agree on everything but the clocks (losses included)."""
    clocks = ("it_s", "img_s", "elapsed_s", "train_s")
    rows = [[{k: v for k, v in r.items() if k not in clocks} for r in rows_of(d)] for d in (a, b)]
    return rows[0] == rows[1]


def test_every_schedule_is_in_the_vocabulary():
    assert RATIO_SCHEDULES == get_args(RatioSchedule) == ("constant", "linear", "cosine")
    with pytest.raises(ValueError, match="unknown ratio schedule 'step'"):
        scheduled_ratio("step", 0.5, 0.25, 0, 10)
    with pytest.raises(ValueError, match="needs ratio_final"):
        scheduled_ratio("linear", 0.5, None, 0, 10)


# (schedule, ratio at steps 0, S/4, S/2, S, 2S) from 0.2 to 0.6 over S = 40 steps.
COS_QUARTER = 0.2 + 0.4 * (1 - math.cos(math.pi / 4)) / 2
EXPECTED = {
    "constant": (0.2, 0.2, 0.2, 0.2, 0.2),
    "linear": (0.2, 0.3, 0.4, 0.6, 0.6),
    "cosine": (0.2, COS_QUARTER, 0.4, 0.6, 0.6),
}


@pytest.mark.parametrize("schedule", RATIO_SCHEDULES)
def test_schedule_at_its_ends_and_midpoints(schedule):
    values = [scheduled_ratio(schedule, 0.2, 0.6, step, 40) for step in (0, 10, 20, 40, 80)]
    assert values == pytest.approx(EXPECTED[schedule], abs=1e-12)
    # The ends are exact: step 0 draws as the constant route would, and the final ratio holds.
    assert values[0] == 0.2 and values[-1] == values[-2] == EXPECTED[schedule][-1]
    # Monotone on the way, and a decreasing schedule stays between its ends too.
    path = [scheduled_ratio(schedule, 0.2, 0.6, s, 40) for s in range(41)]
    assert path == sorted(path)
    down = [scheduled_ratio(schedule, 0.75, 0.25, s, 7) for s in range(10)]
    assert all(0.25 <= r <= 0.75 for r in down) and down == sorted(down, reverse=True)


def test_cosine_is_slower_than_linear_at_the_start_and_faster_in_the_middle():
    linear = [scheduled_ratio("linear", 0.0, 0.8, s, 100) for s in range(101)]
    cosine = [scheduled_ratio("cosine", 0.0, 0.8, s, 100) for s in range(101)]
    assert cosine[10] < linear[10] and cosine[90] > linear[90]
    assert cosine[51] - cosine[49] > linear[51] - linear[49]


def test_route_config_horizon_defaults_to_the_runs_steps():
    spec = RouteConfig(start=1, end=1, ratio=0.0, schedule="linear", ratio_final=0.5)
    assert spec.ratio_at(50, 100) == pytest.approx(0.25)
    assert spec.ratio_at(100, 100) == 0.5
    fixed = RouteConfig(1, 1, 0.0, schedule="linear", ratio_final=0.5, schedule_steps=10)
    assert fixed.ratio_at(5, 100) == pytest.approx(0.25) and fixed.ratio_at(50, 100) == 0.5
    assert RouteConfig(1, 1, 0.3).ratio_at(12345, 10) == 0.3


def test_linear_schedule_changes_the_kept_count_of_a_real_training(tmp_path, monkeypatch):
    from tread.train import loop

    kept = []
    real = loop.sample_plan

    def spy(batch, num_tokens, num_kept, **kwargs):
        kept.append(num_kept)
        return real(batch, num_tokens, num_kept, **kwargs)

    monkeypatch.setattr(loop, "sample_plan", spy)
    config = tiny_config(
        tmp_path,
        "train.steps=6",
        *LINEAR,
        "model.routes.0.ratio_final=0.75",
        "model.routes.0.schedule_steps=4",
    )
    result = train(config, progress=False)
    # Skip ratio 0, 3/16, 6/16, 9/16, then 12/16 from step 4 on: K = N - floor(N r).
    assert kept == [16, 13, 10, 7, 4, 4]
    rows = [r for r in rows_of(result.run_dir) if "loss" in r]
    assert [r["kept/0"] for r in rows] == kept  # row of step s: the step s - 1 just trained
    assert [r["ratio/0"] for r in rows] == pytest.approx([0, 0.1875, 0.375, 0.5625, 0.75, 0.75])
    assert "phase" not in rows[0]  # no fine-tune phase configured


def test_a_flat_schedule_trains_exactly_like_a_constant_route(tmp_path):
    """The scheduled path (new Route objects each step) draws what the constant path draws."""
    steps = ("train.steps=3", "train.ckpt_every=0")
    constant = train(tiny_config(tmp_path / "c", *steps), progress=False)
    flat = train(
        tiny_config(
            tmp_path / "f",
            *steps,
            "model.routes.0.schedule=cosine",
            "model.routes.0.ratio_final=0.5",
        ),
        progress=False,
    )
    for a, b in zip(weights(constant.checkpoint), weights(flat.checkpoint), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert "kept/0" not in rows_of(constant.run_dir)[0]
    assert rows_of(flat.run_dir)[0]["kept/0"] == 8


def test_resume_in_the_middle_of_a_schedule_is_bit_exact(tmp_path):
    schedule = (*LINEAR, "model.routes.0.ratio_final=0.75", "model.routes.0.schedule_steps=6")
    straight = train(tiny_config(tmp_path / "a", "train.steps=8", *schedule), progress=False)
    train(tiny_config(tmp_path / "b", "train.steps=3", *schedule), progress=False)
    resumed = train(tiny_config(tmp_path / "b", "train.steps=8", *schedule), progress=False)
    for a, b in zip(weights(straight.checkpoint), weights(resumed.checkpoint), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert same_rows(straight.run_dir, resumed.run_dir)


def test_a_default_horizon_is_fixed_when_the_run_starts(tmp_path):
    """schedule_steps None = train.steps of the first run: more steps later do not stretch it."""
    schedule = (*LINEAR, "model.routes.0.ratio_final=0.5")
    first = train(tiny_config(tmp_path, "train.steps=4", *schedule), progress=False)
    saved = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    assert saved["model"]["routes"][0]["schedule_steps"] == 4
    assert ckpt.read_config(first.checkpoint).model.routes[0].schedule_steps == 4
    resumed = train(tiny_config(tmp_path, "train.steps=6", *schedule), progress=False)
    assert resumed.config.model.routes[0].schedule_steps == 4
    rows = [r for r in rows_of(resumed.run_dir) if "loss" in r]
    assert [r["ratio/0"] for r in rows] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])
    # A different explicit horizon is another model: refused as any route change is.
    with pytest.raises(ckpt.CheckpointError, match="model.routes"):
        train(
            tiny_config(tmp_path, "train.steps=8", *schedule, "model.routes.0.schedule_steps=8"),
            progress=False,
        )


def test_step_routes_follow_the_schedule_and_the_phase():
    from tread.config import load_config
    from tread.train.phases import step_routes

    config = load_config(
        "digits_tread",
        [
            *LINEAR,
            "model.routes.0.ratio_final=0.5",
            "model.routes.0.schedule_steps=10",
            "train.finetune_from=20",
        ],
    )
    resolved = (Route(2, 3, 0.0),)
    assert step_routes(config, resolved, 0) == (Route(2, 3, 0.0),)
    assert step_routes(config, resolved, 5) == (Route(2, 3, 0.25),)
    assert step_routes(config, resolved, 19) == (Route(2, 3, 0.5),)
    assert step_routes(config, resolved, 20) == ()  # dense fine-tune
    plain = load_config("digits_tread")
    assert step_routes(plain, resolved, 999) == resolved
