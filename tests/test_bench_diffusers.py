"""``tread bench --diffusers``: routed vs plain training steps of diffusers transformers.

Tiny configs, one timed repeat: the numbers are checked for sense, not speed (timing belongs to
docs/benchmarks.md, measured alone).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from tread import Route  # noqa: E402
from tread.bench import (  # noqa: E402
    ARMS,
    benchmark_diffusers,
    counted_forward_flops,
    format_table,
    time_arms,
)
from tread.cli import main as cli_main  # noqa: E402
from tread.errors import ConfigError  # noqa: E402
from tread.integrations.diffusers import enable_routing  # noqa: E402
from tread.integrations.diffusers_configs import (  # noqa: E402
    DIFFUSERS_CONFIGS,
    DiffusersConfig,
    build_diffusers_model,
    diffusers_config,
    training_inputs,
)

TINY = ["dit-tiny", "flux-tiny"]
QUICK = {"batch": 2, "warmup": 0, "repeats": 1, "steps_per_repeat": 1}


def _counted_ratio(config: DiffusersConfig, routes: list[Route]) -> float:
    """Dense / routed forward FLOPs, counted here independently of benchmark_diffusers."""
    torch.manual_seed(0)
    dense = build_diffusers_model(config)
    routed = copy.deepcopy(dense)
    enable_routing(routed, routes)
    inputs, _ = training_inputs(config, 2, generator=torch.Generator().manual_seed(0))
    flops = [counted_forward_flops(lambda m=m: m(**inputs).sample) for m in (dense, routed)]
    return flops[0] / flops[1]


@pytest.mark.parametrize("name", TINY)
def test_result_fields_are_sane_and_the_ideal_is_the_counted_ratio(name):
    routes = [Route(1, -2, 0.5)]
    result = benchmark_diffusers(name, routes, **QUICK)
    config = DIFFUSERS_CONFIGS[name]
    assert result.model == name and result.flops_source == "counted"
    assert (result.tokens, result.text_tokens) == (config.image_tokens, config.text_tokens)
    assert result.routes == [{"start": 1, "end": 2, "ratio": 0.5}]  # resolved against depth 4
    assert len(result.dense.step_seconds) == len(result.routed.step_seconds) == 1
    assert result.speedup > 0 and result.dense.images_per_second > 0
    assert result.ideal_speedup > 1
    assert result.ideal_speedup == pytest.approx(_counted_ratio(config, routes), rel=1e-9)
    assert result.ideal_speedup == pytest.approx(
        result.dense.forward_gflops / result.routed.forward_gflops
    )
    assert result.fraction_of_ideal == pytest.approx(result.speedup / result.ideal_speedup)


def test_a_route_that_skips_nothing_has_ideal_one():
    result = benchmark_diffusers("dit-tiny", [Route(1, 2, 0.0)], **QUICK)
    assert result.ideal_speedup == 1.0


def test_text_tokens_that_always_pass_lower_the_ideal():
    # Same blocks, same image tokens, same route; only the text that every block sees grows.
    base = DIFFUSERS_CONFIGS["flux-tiny"]
    ratios = []
    for text_tokens in (1, 64):
        config = DiffusersConfig(**{**base.__dict__, "text_tokens": text_tokens})
        ratios.append(_counted_ratio(config, [Route(0, 3, 0.5)]))
    assert ratios[0] > ratios[1] > 1


def test_flop_count_includes_attention_on_cpu():
    # CPU runs this through its own fused kernel, which FlopCounterMode does not price itself.
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    flops = counted_forward_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * 3 * 5 * 7 * 8) * 2  # Q K^T and P V, 2 FLOPs per multiply-add


@pytest.mark.parametrize("name", TINY)
def test_training_inputs_fit_the_model(name):
    config = DIFFUSERS_CONFIGS[name]
    model = build_diffusers_model(config)
    inputs, target = training_inputs(config, 3, generator=torch.Generator().manual_seed(0))
    assert model(**inputs).sample.shape == target.shape


def test_time_arms_runs_each_factory_step_interleaved():
    calls: list[str] = []

    def make_step(arm: str):
        return lambda: calls.append(arm)

    timings = time_arms(
        make_step, device=torch.device("cpu"), warmup=1, repeats=3, steps_per_repeat=2
    )
    warmup = ["dense", "routed"]
    rounds = ["dense"] * 2 + ["routed"] * 2, ["routed"] * 2 + ["dense"] * 2  # order alternates
    assert calls == warmup + rounds[0] + rounds[1] + rounds[0]
    assert all(len(timings[arm].step_seconds) == 3 for arm in ARMS)


def test_unknown_config_is_one_error_listing_the_names():
    with pytest.raises(ConfigError, match="unknown diffusers config 'dit-q'; known: dit-s, "):
        diffusers_config("dit-q")


def test_flux_rope_axes_must_sum_to_the_head_width():
    base = DIFFUSERS_CONFIGS["flux-tiny"]
    with pytest.raises(ConfigError, match="rope_axes"):
        DiffusersConfig(**{**base.__dict__, "rope_axes": (4, 4, 4)})


def test_cli_runs_and_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--diffusers", *TINY, "--batch", "2", "--warmup", "0", "--repeats", "1"]
    argv += ["--steps-per-repeat", "1", "--route-start", "1", "--route-end", "-2"]
    argv += ["--device", "cpu", "--threads", "1", "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "dit-tiny" in text and "16+5" in text and "ideal counted" in text
    assert "DiT-S/2" not in text  # --diffusers alone does not run the tread defaults
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == TINY
    for row in rows:
        assert row["flops_source"] == "counted" and row["ideal_speedup"] > 1
        assert row["routes"] == [{"start": 1, "end": 2, "ratio": 0.5}]


def test_cli_refuses_an_unknown_name_in_one_line(capsys):
    assert cli_main(["bench", "--diffusers", "dit-tiny", "sd3-xl", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "'sd3-xl'" in err and all(name in err for name in DIFFUSERS_CONFIGS)


def test_format_table_marks_counted_ideals():
    result = benchmark_diffusers("flux-tiny", [Route(1, 2, 0.5)], **QUICK)
    table = format_table([result])
    assert "16+5" in table and "x*" in table and "ideal counted" in table
