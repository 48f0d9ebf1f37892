"""The scripts in examples/ run, with tiny settings, and report what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

diffusers = pytest.importorskip("diffusers")

from tread.errors import ConfigError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--steps", "3", "--batch", "8", "--samples", "20", "--sample-steps", "2"]
TINY += ["--threads", "1"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune() -> ModuleType:
    return _load("finetune_diffusers_dit")


def _check_arms(summary: dict) -> None:
    for arm in ("dense", "routed"):
        assert math.isfinite(summary[arm]["fd"]) and summary[arm]["fd"] >= 0
        assert 0 <= summary[arm]["acc"] <= 1
        assert summary[arm]["it_s"] > 0 and math.isfinite(summary[arm]["final_loss"])
    assert summary["speedup"] > 0


def test_finetune_example_trains_both_arms_and_scores_them(finetune, tmp_path, capsys):
    out = tmp_path / "summary.json"
    summary = finetune.main([*TINY, "--out", str(out)])
    _check_arms(summary)
    assert summary["depth"] == 8 and summary["route"] == {"start": 2, "end": 4, "ratio": 0.5}
    assert summary["ideal_speedup"] > 1  # the routed arm's forward really routes
    assert json.loads(out.read_text()) == summary
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "routed" in printed


def _save_dit(path: Path, in_channels: int = 1) -> Path:
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels,  # a learned variance, as published DiTs have
        num_layers=2,
        sample_size=8,
        patch_size=1,
        num_embeds_ada_norm=10,
    )
    model.save_pretrained(path)
    return path


def test_finetune_example_reads_a_save_pretrained_folder(finetune, tmp_path):
    folder = _save_dit(tmp_path / "dit")
    argv = [*TINY, "--pretrained", str(folder), "--objective", "flow"]
    summary = finetune.main([*argv, "--route-start", "0", "--route-end", "0"])
    _check_arms(summary)
    assert summary["depth"] == 2 and summary["pretrained"] == str(folder)


def test_finetune_example_refuses_a_folder_that_does_not_fit_digits(finetune, tmp_path):
    folder = _save_dit(tmp_path / "latent_dit", in_channels=4)
    with pytest.raises(ConfigError, match="in_channels=4.*digits has 1 channel"):
        finetune.main([*TINY, "--pretrained", str(folder)])
    with pytest.raises(ConfigError, match="no config.json"):
        finetune.main([*TINY, "--pretrained", str(tmp_path / "missing")])


def test_finetune_example_arms_differ_only_by_routing(finetune):
    # Ratio 0 routes nothing: the arms must then train and sample identically (same weights,
    # batches, noise, label dropout), so any gap at ratio 0.5 comes from routing alone.
    summary = finetune.main([*TINY, "--ratio", "0"])
    assert summary["ideal_speedup"] == 1.0
    for key in ("final_loss", "fd", "acc"):
        assert summary["dense"][key] == summary["routed"][key]
