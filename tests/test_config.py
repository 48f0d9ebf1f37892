"""Config: every preset parses, inheritance, overrides, cross-section checks, resolution from the
registry and the data, and bad input refused by name."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest
import yaml

from tread.config import (
    DEVICES,
    OBJECTIVE_KEYS,
    OBJECTIVES,
    PRECISIONS,
    PRESET_DIR,
    TIME_SAMPLINGS,
    Precision,
    TrainDevice,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from tread.data import SPLITS
from tread.data.digits import Split
from tread.errors import ConfigError
from tread.models import MODEL_CONFIGS
from tread.routing.schedule import RatioSchedule
from tread.sampling import SAMPLERS
from tread.train import prepare_run, resolve_run
from tread.transport.flow import TimeSampling
from tread.transport.types import ObjectiveName

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))

HEADER = (
    "# DiT-S/2 registry entry with depth 8, width 128, 4 heads; "
    "tokens: 64 (8x8, patch 1); routes: r(2→4, 0.5)"
)


def test_presets_exist():
    assert {"digits_dit", "digits_tread"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_parses_and_round_trips(name):
    config = load_config(name)
    for route in config.routes():
        route.resolve(config.depth())
    assert config_from_dict(config_to_dict(config)) == config
    # The saved YAML loads back as a preset (with its derived comment line and without the
    # keys the objective does not read).
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config


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


def test_override_one_past_the_end_adds_a_route():
    config = load_config("digits_tread", ["model.routes.1.start=5", "model.routes.1.end=6"])
    assert [(r.start, r.end, r.ratio) for r in config.model.routes] == [(2, -4, 0.5), (5, 6, 0.5)]
    # Unset fields take the defaults: start 5 with the default end -4 (block 4) is refused
    # by name, not as an unknown key.
    with pytest.raises(ConfigError, match=r"model.routes.1: start=5 comes after end=-4"):
        load_config("digits_tread", ["model.routes.1.start=5"])
    with pytest.raises(ConfigError, match=r"has 1 item\(s\), so the next one is model.routes.1"):
        load_config("digits_tread", ["model.routes.2.start=5"])


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
        # Cross-section: the sampler must integrate the objective's prediction.
        (["objective.name=flow"], "sample.sampler='edm_heun' integrates an 'edm' model"),
        (["sample.sampler=flow_euler"], "objective.name='edm'; use one of: edm_heun"),
        # Routes against the real depth (digits: model.depth=8; DiT-S/2's registry depth: 12).
        (["model.routes.0.end=12"], r"model.routes.0.end=12 is out of range .* model.depth=8"),
        (["model.routes.0.end=8"], "model.routes.0.end=8 is out of range"),
        (["model.routes.0.start=-9"], "model.routes.0.start=-9 is out of range"),
        (["model.depth=null", "model.routes.0.end=12"], "model.depth=12 blocks"),
        (["model.routes.0.start=5"], "model.routes.0: start=5 comes after end=-4"),
        (["model.routes=[{start: 4, end: 5}, {start: 1, end: 2}]"], "model.routes.1 .*overlaps"),
        (["model.routes=[{start: 1, end: 3}, {start: 3, end: 4}]"], "model.routes.1 .*overlaps"),
        # Numeric fields.
        (["model.mlp_ratio=-1"], "model.mlp_ratio=-1.0 must be > 0"),
        (["model.num_classes=0"], "model.num_classes=0 must be >= 1"),
        (["model.width=130"], "model.width=130 is not divisible by model.heads=4"),
        (["model.input_size=9", "model.patch_size=2"], "model.input_size=9 is not divisible"),
        (["train.num_threads=-1"], "train.num_threads=-1 must be >= 1"),
        (["train.parallel=zero3"], "train.parallel='zero3' is not one of ddp | fsdp"),
        (["train.activation_checkpointing=maybe"], "train.activation_checkpointing"),
        (["train.num_threads=0"], "train.num_threads=0 must be >= 1"),
        (["train.seed=-1"], "train.seed=-1 must be >= 0"),
        (["optim.eps=-1"], "optim.eps=-1.0 must be > 0"),
        (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["objective.sigma_data=0"], "objective.sigma_data=0.0 must be > 0"),
        (["data.latent_scale=0"], "data.latent_scale=0.0 must be > 0"),
        (["data.pad_to=0"], "data.pad_to=0 must be >= 1"),
        (["sample.grid_size=0"], "sample.grid_size=0 must be > 0"),
        (["sample.guidance_interval=[0.5, 0.1]"], "sample.guidance_interval"),
        (["eval.every=-5"], "eval.every=-5 must be >= 0"),
        (["eval.num_samples=0"], "eval.num_samples=0 must be > 0"),
        (["eval.reference_split=val"], "eval.reference_split='val' is not one of train | test"),
        (["eval.feature_net=incepton"], "eval.feature_net='incepton' is not one of"),
        # A key the chosen objective never reads, set by hand, is a mistake.
        (["objective.time_sampling=uniform"], "objective.time_sampling: objective.name='edm'"),
    ],
)
def test_bad_overrides_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits_tread", overrides)


# Closed vocabularies: one Literal each; every member is accepted, the tuples are its args.
@pytest.mark.parametrize("name", get_args(ObjectiveName))
def test_every_objective_loads_with_a_matching_sampler(name):
    sampler = next(k for k, spec in SAMPLERS.items() if spec.objective == name)
    config = load_config("digits_tread", [f"objective.name={name}", f"sample.sampler={sampler}"])
    assert config.objective.name == name


@pytest.mark.parametrize("value", get_args(TimeSampling))
def test_every_time_sampling_loads(value):
    overrides = ["objective.name=flow", "sample.sampler=flow_euler"]
    config = load_config("digits_tread", [*overrides, f"objective.time_sampling={value}"])
    assert config.objective.time_sampling == value


@pytest.mark.parametrize(
    "key, values", [("train.precision", get_args(Precision)), ("train.device", DEVICES)]
)
def test_every_train_choice_loads(key, values):
    for value in values:
        section, field = key.split(".")
        config = load_config("digits_tread", [f"{key}={value}"])
        assert getattr(getattr(config, section), field) == value


@pytest.mark.parametrize("split", get_args(Split))
def test_every_split_loads(split):
    assert load_config("digits_tread", [f"data.split={split}"]).data.split == split


def test_vocabularies_come_from_their_literals():
    assert OBJECTIVES == get_args(ObjectiveName) == tuple(OBJECTIVE_KEYS)
    assert get_args(TimeSampling) == TIME_SAMPLINGS
    assert get_args(Precision) == PRECISIONS
    assert get_args(TrainDevice) == DEVICES
    assert get_args(Split) == SPLITS


def test_saved_config_shows_only_the_objectives_keys(tmp_path):
    edm = yaml.safe_load(config_to_yaml(load_config("digits_tread")))
    assert set(edm["objective"]) == {"name", *OBJECTIVE_KEYS["edm"]}
    flow_config = load_config(
        "digits_tread",
        ["objective.name=flow", "sample.sampler=flow_euler", "objective.time_sampling=uniform"],
    )
    flow = yaml.safe_load(config_to_yaml(flow_config))
    assert set(flow["objective"]) == {"name", *OBJECTIVE_KEYS["flow"]}
    # The pruned YAML loads back: as a dict, and as a config file given to load_config.
    assert config_from_dict(flow) == flow_config
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(flow_config))
    again = load_config(saved)
    assert dataclasses.replace(again, preset=flow_config.preset) == flow_config


def test_inherited_keys_of_another_objective_are_dropped():
    # The SiT preset inherits p_mean/p_std/sigma_data from its EDM base: no error, not shown.
    sit = "imagenet256_sit_xl2_tread"
    assert "p_mean" not in config_to_dict(load_config(sit))["objective"]


def test_resolved_config_fills_registry_and_data_values():
    config = resolve_run(load_config("digits_tread"))
    model = config.model
    assert (model.depth, model.width, model.heads, model.patch_size) == (8, 128, 4, 1)
    assert model.mlp_ratio == MODEL_CONFIGS["DiT-S/2"].mlp_ratio
    assert (model.input_size, model.in_channels, model.num_classes) == (8, 1, 10)
    text = config_to_yaml(config)
    assert text.splitlines()[0] == HEADER
    assert "null" not in yaml.safe_dump(config_to_dict(config)["model"])
    # Resolving again changes nothing (the loop may resolve a config --dry-run resolved).
    assert resolve_run(config) == config


def test_registry_depth_used_when_model_depth_unset():
    config = load_config("digits_tread", ["model.depth=null", "model.routes.0.end=-2"])
    resolved = resolve_run(config)
    assert resolved.model.depth == MODEL_CONFIGS["DiT-S/2"].depth == 12
    assert "routes: r(2→10, 0.5)" in config_to_yaml(resolved)


@pytest.mark.parametrize(
    "value, message",
    [
        (5, "model.num_classes=5 but data digits has labels up to 9"),
        (9, "labels >= 9 would be read as the null"),
        (12, "model.num_classes=12 but data digits has exactly 10 classes"),
    ],
)
def test_num_classes_must_fit_the_data(value, message):
    config = load_config("digits_tread", [f"model.num_classes={value}"])
    with pytest.raises(ConfigError, match=message):
        prepare_run(config)


def test_num_classes_may_extend_an_inferred_label_set(tmp_path):
    # An .npz's class count is inferred from its largest label (here 2): a model may declare
    # more (a subset of a bigger label set keeps its ids); the data then agrees with it.
    path = tmp_path / "d.npz"
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array([0, 1, 2, 1]))
    base = ["data.name=npz", f"data.path={path}", "model.patch_size=2", "model.routes=[]"]
    config, data = prepare_run(load_config("digits_dit", [*base, "model.num_classes=7"]))
    assert config.model.num_classes == data.num_classes == 7
    with pytest.raises(ConfigError, match="model.num_classes=2 but data npz"):
        prepare_run(load_config("digits_dit", [*base, "model.num_classes=2"]))


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
    with pytest.raises(ConfigError, match="saved config must be a mapping"):
        config_from_dict([])


# --- Route ratio schedules and the dense fine-tune phase (issue 12, item 5) -------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.routes.0.schedule=linearr"], "model.routes.0.schedule='linearr' is not one of"),
        (["model.routes.0.schedule=cosine"], "model.routes.0.schedule='cosine' needs model.routes"),
        (
            ["model.routes.0.schedule=linear", "model.routes.0.ratio_final=1.0"],
            r"model.routes.0.ratio_final=1.0 must be in \[0, 1\)",
        ),
        (
            ["model.routes.0.schedule=linear", "model.routes.0.ratio_final=-0.1"],
            r"model.routes.0.ratio_final=-0.1 must be in \[0, 1\)",
        ),
        (
            ["model.routes.0.schedule=linear", "model.routes.0.ratio_final=.nan"],
            r"model.routes.0.ratio_final=nan must be in \[0, 1\)",
        ),
        (
            [
                "model.routes.0.schedule=linear",
                "model.routes.0.ratio_final=0.2",
                "model.routes.0.schedule_steps=0",
            ],
            "model.routes.0.schedule_steps=0 must be >= 1",
        ),
        (["model.routes.0.ratio_final=0.3"], "model.routes.0.ratio_final=0.3 needs model.routes"),
        (["model.routes.0.schedule_steps=10"], "model.routes.0.schedule_steps=10 needs model"),
        (["train.finetune_from=0"], "train.finetune_from=0 must be >= 1"),
        (["train.finetune_from=5000"], "train.finetune_from=5000 is past train.steps=1000"),
        (["train.finetune_from=10", "train.finetune_lr=0"], r"train.finetune_lr=0.0 must be > 0"),
        (["train.finetune_from=10", "train.finetune_lr=-1e-5"], "train.finetune_lr=-1e-05 must"),
        (["train.finetune_lr=1e-5"], "train.finetune_lr=1e-05 needs train.finetune_from"),
        (
            ["model.routes=[]", "train.finetune_from=10"],
            "train.finetune_from=10 does nothing: model.routes is empty",
        ),
    ],
)
def test_bad_schedule_and_finetune_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("digits_tread", overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("schedule", get_args(RatioSchedule))
def test_every_ratio_schedule_loads_and_round_trips(schedule):
    extra = [] if schedule == "constant" else ["model.routes.0.ratio_final=0.25"]
    config = load_config(
        "digits_tread",
        [f"model.routes.0.schedule={schedule}", *extra, "train.finetune_from=900"],
    )
    assert config.model.routes[0].schedule == schedule
    saved = config_to_dict(config)
    # The schedule keys are saved once a schedule is on; the fine-tune keys once it is set.
    assert ("schedule" in saved["model"]["routes"][0]) == (schedule != "constant")
    assert saved["train"]["finetune_from"] == 900 and saved["train"]["finetune_lr"] is None
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config


def test_finetune_of_a_dense_run_needs_a_rate_and_gets_it():
    """A dense twin may share the fine-tune phase's rate change (routing is already off)."""
    config = load_config("digits_dit", ["train.finetune_from=500", "train.finetune_lr=1e-5"])
    assert config.model.routes == []
    assert config.train.in_finetune(500) and not config.train.in_finetune(499)
    assert config.train.finetune_lr == 1e-5


def test_cli_dry_run_refuses_a_bad_schedule_before_writing(tmp_path, capsys):
    from tread.cli import main

    run_dir = tmp_path / "run"
    code = main(
        ["train", "--dry-run", "model.routes.0.schedule=linear", f"train.run_dir={run_dir}"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "model.routes.0.schedule='linear' needs model.routes.0.ratio_final" in err
    assert not run_dir.exists()
