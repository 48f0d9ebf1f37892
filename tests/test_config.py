"""Config: every preset parses, inheritance, overrides, and bad input refused by name."""

from __future__ import annotations

import pytest

from tread.config import PRESET_DIR, config_from_dict, config_to_dict, load_config
from tread.errors import ConfigError

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"digits_dit", "digits_tread"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_parses_and_round_trips(name):
    config = load_config(name)
    for route in config.routes():
        route.resolve(config.model.depth or 12)
    assert config_from_dict(config_to_dict(config)) == config


def test_tread_presets_differ_from_dense_only_in_routes_and_run_dir():
    for dense, routed in [
        ("digits_dit", "digits_tread"),
        ("fashion_dit", "fashion_tread"),
        ("imagenet256_dit_xl2_dense", "imagenet256_dit_xl2_tread"),
    ]:
        if dense not in PRESETS:
            continue
        a, b = config_to_dict(load_config(dense)), config_to_dict(load_config(routed))
        assert a["model"]["routes"] == [] and b["model"]["routes"]
        for section in a:
            if section in ("preset",):
                continue
            diff = {k for k in a[section] if a[section][k] != b[section][k]}
            allowed = {"model": {"routes"}, "train": {"run_dir"}}.get(section, set())
            assert diff <= allowed, (dense, section, diff)


def test_overrides_typed_and_list_indices():
    config = load_config(
        "digits_tread", ["train.steps=7", "model.routes.0.ratio=0.25", "optim.grad_clip=null"]
    )
    assert config.train.steps == 7
    assert config.model.routes[0].ratio == 0.25
    assert config.optim.grad_clip is None
    config = load_config("digits_tread", ["model.routes=[]"])
    assert config.routes() == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nonsense=1"], "unknown key 'nonsense'"),
        (["train.stepz=1"], "unknown key 'train.stepz'"),
        (["train.steps=many"], "train.steps"),
        (["train.steps=0"], "train.steps=0 must be > 0"),
        (["model.name=DiT-Q/2"], "model.name='DiT-Q/2'"),
        (["objective.name=ddpm"], "objective.name='ddpm'"),
        (["data.name=imagenet"], "data.name='imagenet'"),
        (["sample.sampler=dpm"], "sample.sampler='dpm'"),
        (["model.routes.0.ratio=1.0"], "ratio"),
        (["train.steps"], "key=value"),
        (["optim.beta1=1.5"], "optim.beta1"),
    ],
)
def test_bad_overrides_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits_tread", overrides)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="widht"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(broken)
    child = tmp_path / "child.yaml"
    child.write_text("base: digits_dit\ntrain:\n  steps: 5\n")
    assert load_config(child).train.steps == 5
    assert load_config(child).model.width == load_config("digits_dit").model.width
