"""``train.init_from``: a new run (step 0, fresh optimizer and data) from existing weights."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import ConfigError
from tread.train import DistInfo, prepare_run, train
from tread.train import checkpoint as ckpt
from tread.train.builders import build_from_config
from tread.train.setup import start_run

from conftest import TINY_RUN, ddp_train_worker, free_port

TINY = TINY_RUN


def tiny_config(run_dir, *extra):
    return load_config("digits_tread", [*TINY, f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A routed run trained 4 steps with checkpoints at steps 2 and 4 (read-only for tests)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train(tiny_config(run_dir, "train.steps=4", "train.ckpt_every=2"), progress=False)
    return run_dir


@contextmanager
def started(config):
    """The run as it stands before its first step (``start_run``), closed afterwards."""
    config, data = prepare_run(config)
    run = start_run(config, data, DistInfo(), allow_changes=False, progress=False)
    try:
        yield run
    finally:
        run.close()


def assert_weights(module, expected):
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def saved_train_config(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]


def test_a_checkpoint_starts_a_new_run_with_its_model_and_ema(source, tmp_path):
    checkpoint = source / "checkpoints" / "step_0000002"
    model, ema = (load_file(str(checkpoint / name)) for name in ckpt.WEIGHT_FILES)
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # the EMA is its own
    plain_run = tmp_path / "plain"
    with started(tiny_config(plain_run)) as plain:
        fresh_stream = plain.batches.state_dict()
    assert "init_from" not in saved_train_config(plain_run)  # unset: not in the saved config
    config = tiny_config(tmp_path / "run", f"train.init_from={checkpoint}")
    with started(config) as run:
        assert run.step == 0 and run.last_checkpoint is None
        assert_weights(run.model, model)
        assert_weights(run.ema, ema)  # the source's EMA, not a copy of its model
        assert run.optimizer.state_dict()["state"] == {}  # fresh Adam moments
        assert run.batches.state_dict() == fresh_stream  # the data stream starts over
    assert saved_train_config(tmp_path / "run")["init_from"] == str(checkpoint)
    # And it trains on from there: steps 1..2 of a new run, its own checkpoint at step 2.
    result = train(
        tiny_config(tmp_path / "run", "train.steps=2", f"train.init_from={checkpoint}"),
        progress=False,
    )
    assert result.step == 2 and result.checkpoint.name == "step_0000002"
    assert ckpt.read_config(result.checkpoint).train.init_from == str(checkpoint)
    trained = load_file(str(result.checkpoint / "model.safetensors"))
    assert not torch.equal(trained["final_layer.linear.weight"], model["final_layer.linear.weight"])


def test_a_run_directory_gives_its_newest_checkpoint(source, tmp_path, caplog):
    newest = source / "checkpoints" / "step_0000004"
    assert [p.name for p in ckpt.list_checkpoints(source)] == ["step_0000002", "step_0000004"]
    config = tiny_config(tmp_path / "run", f"train.init_from={source}")
    with caplog.at_level(logging.INFO, logger="tread.train.init_weights"), started(config) as run:
        assert_weights(run.model, load_file(str(newest / "model.safetensors")))
        assert_weights(run.ema, load_file(str(newest / "ema.safetensors")))
    # The config records the checkpoint used, not the run directory (whose newest one moves on).
    assert saved_train_config(tmp_path / "run")["init_from"] == str(newest)
    assert f"train.init_from={source}" in caplog.text and str(newest) in caplog.text


def test_a_safetensors_file_gives_model_and_ema_and_routes_do_not_matter(tmp_path):
    # Weights of a dense twin (no routes) serve the routed model: routes have no parameters.
    dense, _ = prepare_run(tiny_config(tmp_path / "x", "model.routes=[]"))
    net = build_from_config(dense)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn_like(parameter))
    file = tmp_path / "weights.safetensors"
    save_file(ckpt.clean_state_dict(net.state_dict()), str(file))
    config = tiny_config(tmp_path / "run", f"train.init_from={file}")
    assert config.model.routes  # the run itself is routed
    with started(config) as run:
        assert_weights(run.model, load_file(str(file)))
        assert_weights(run.ema, load_file(str(file)))
    assert saved_train_config(tmp_path / "run")["init_from"] == str(file)


def weights_of(tmp_path, *overrides):
    """A .safetensors file of a tiny model built with ``overrides`` (shapes are what matter)."""
    resolved, _ = prepare_run(tiny_config(tmp_path / "x", *overrides))
    file = tmp_path / "other.safetensors"
    save_file(ckpt.clean_state_dict(build_from_config(resolved).state_dict()), str(file))
    return file


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.width=48"],
            r"patch_embed\.proj\.weight has shape \(48, 1, 2, 2\), this model expects "
            r"\(32, 1, 2, 2\); \d+ more tensor\(s\) of another shape",
        ),
        (["model.depth=2"], r"blocks\.2\.\S+ is missing \(this model expects shape \(\d"),
        (["model.depth=4"], r"blocks\.3\.\S+ \(shape \(\d.*\) is not a tensor of this model"),
    ],
)
def test_weights_that_do_not_fit_are_refused_before_anything_is_written(
    tmp_path, overrides, message
):
    file = weights_of(tmp_path, *overrides)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^train\.init_from={file}: {message}") as err:
        train(tiny_config(run_dir, f"train.init_from={file}"), progress=False)
    assert "\n" not in str(err.value)
    assert not run_dir.exists()


def test_a_checkpoint_of_another_width_names_the_tensor_and_file(source, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, "model.width=48", f"train.init_from={source}")
    newest = source / "checkpoints" / "step_0000004" / "model.safetensors"
    with pytest.raises(ConfigError) as err:
        train(config, progress=False)
    head, _, tail = str(err.value).partition("; ")
    assert head == (
        f"train.init_from={source}: patch_embed.proj.weight has shape (32, 1, 2, 2), this "
        "model expects (48, 1, 2, 2)"
    )
    assert tail.endswith(f"more tensor(s) of another shape (in {newest})")
    assert not run_dir.exists()


def bad_source(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nowhere", "does not exist"
    if kind == "empty dir":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "no complete checkpoint in"
    if kind == "other file":
        (tmp_path / "weights.pt").write_bytes(b"not safetensors")
        return tmp_path / "weights.pt", "is a file but not a .safetensors file"
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    return tmp_path / "bad.safetensors", "cannot read weights"


KINDS = ["missing", "empty dir", "other file", "corrupt file"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_path_that_is_no_source_of_weights_is_refused(tmp_path, kind):
    path, message = bad_source(tmp_path, kind)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^train\.init_from={path}: .*{message}") as err:
        train(tiny_config(run_dir, f"train.init_from={path}"), progress=False)
    assert "\n" not in str(err.value)
    assert not run_dir.exists()


def test_an_empty_init_from_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from must not be empty"):
        tiny_config(tmp_path / "run", "train.init_from=' '")


@pytest.mark.parametrize("kind", KINDS)
def test_dry_run_reports_the_same_errors(tmp_path, capsys, kind):
    path, message = bad_source(tmp_path, kind)
    run_dir = tmp_path / "run"
    args = ["train", "--dry-run", *TINY, f"train.run_dir={run_dir}", f"train.init_from={path}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"train.init_from={path}: " in err and message in err and "\n" not in err
    assert not run_dir.exists()


def test_dry_run_checks_shapes_and_prints_the_source(source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--dry-run", *TINY, f"train.run_dir={run_dir}", f"train.init_from={source}"]
    assert cli_main([*args, "model.width=48"]) == 2
    err = capsys.readouterr().err
    assert (
        "patch_embed.proj.weight has shape (32, 1, 2, 2), this model expects (48, 1, 2, 2)" in err
    )
    assert cli_main(args) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["init_from"] == str(source)
    assert not run_dir.exists()


def test_resume_wins_over_init_from(source, tmp_path, caplog):
    run_dir = tmp_path / "run"
    first_source = source / "checkpoints" / "step_0000002"
    extra = ("train.ckpt_every=2",)
    first = train(
        tiny_config(run_dir, "train.steps=2", f"train.init_from={first_source}", *extra),
        progress=False,
    )
    own = {name: load_file(str(first.checkpoint / name)) for name in ckpt.WEIGHT_FILES}
    # Another init_from, even one that does not exist, changes nothing: the run resumes from
    # its own checkpoint, is not refused as a changed setting, and keeps its first source.
    for other in (source, tmp_path / "nowhere", None):
        setting = [] if other is None else [f"train.init_from={other}"]
        config = tiny_config(run_dir, "train.steps=4", *setting, *extra)
        with caplog.at_level(logging.INFO, logger="tread.train.setup"), started(config) as run:
            assert run.step == 2 and run.last_checkpoint == first.checkpoint
            assert_weights(run.model, own["model.safetensors"])
            assert_weights(run.ema, own["ema.safetensors"])
            assert run.optimizer.state_dict()["state"]  # the run's own Adam moments
        assert saved_train_config(run_dir)["init_from"] == str(first_source)
        if other is not None:
            assert f"train.init_from={other} ignored: resuming from {first.checkpoint}" in (
                caplog.text
            )
        caplog.clear()
    # Only the longer run is recorded as a change (train.steps), never init_from.
    assert "init_from" not in (run_dir / "config_changes.jsonl").read_text()
    # The dry run agrees: nothing to check, the run resumes.
    args = ["train", "--dry-run", *TINY, f"train.run_dir={run_dir}"]
    assert cli_main([*args, f"train.init_from={tmp_path / 'nowhere'}"]) == 0


def test_two_processes_start_from_the_same_weights_as_one(source, tmp_path):
    extra = ("train.steps=1", "train.ckpt_every=1", f"train.init_from={source}")
    single = train(tiny_config(tmp_path / "one", *extra), progress=False)
    config = tiny_config(tmp_path / "two", *extra)
    mp.spawn(ddp_train_worker, args=(config, free_port()), nprocs=2, join=True)
    double = ckpt.resolve_checkpoint(tmp_path / "two")
    for name in ckpt.WEIGHT_FILES:
        a, b = load_file(str(single.checkpoint / name)), load_file(str(double / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
