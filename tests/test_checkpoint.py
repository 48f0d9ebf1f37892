"""Damaged or foreign checkpoints: one-line CheckpointErrors naming the file, never a traceback."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from test_train import tiny_config
from tread.cli import main as cli_main
from tread.errors import CheckpointError
from tread.train import checkpoint as ckpt
from tread.train import train


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with one checkpoint at step 2 (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("trained")
    train(tiny_config(root, "train.steps=2"), progress=False)
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _damage_meta(step_dir, how):
    meta = step_dir / "meta.json"
    if how == "truncated":
        meta.write_text(meta.read_text()[:7])
    elif how == "no step":
        meta.write_text('{"time": 1.0}')
    else:
        meta.write_text('{"step": "two"}')


@pytest.mark.parametrize(
    "how, problem",
    [("truncated", "is unreadable"), ("no step", "no valid 'step'"), ("bad step", "no valid")],
)
def test_damaged_meta_json_is_a_one_line_error(run, tmp_path, capsys, how, problem):
    step_dir = run / "checkpoints" / "step_0000002"
    _damage_meta(step_dir, how)
    with pytest.raises(CheckpointError, match=f"{step_dir / 'meta.json'}.*{problem}"):
        ckpt.load_for_inference(run)
    with pytest.raises(CheckpointError, match="meta.json"):
        train(tiny_config(tmp_path, "train.steps=4"), progress=False)
    assert cli_main(["sample", str(run), "--count", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tread sample: error: ") and "meta.json" in err and "\n" not in err


@pytest.mark.parametrize("content", ["[]", "3", '"config"'])
def test_config_json_that_is_not_an_object_is_refused(run, tmp_path, content):
    file = run / "checkpoints" / "step_0000002" / "config.json"
    file.write_text(content)
    with pytest.raises(CheckpointError, match=f"{file} is not a JSON object"):
        ckpt.load_for_inference(run)
    with pytest.raises(CheckpointError, match=f"{file} is not a JSON object"):
        train(tiny_config(tmp_path, "train.steps=4"), progress=False)


@pytest.mark.parametrize(
    "drop, problem",
    [
        ("optimizer", "no optimizer state"),
        ("loop", "no loop state"),
        ("loop.data", r"no data-stream position"),
        ("loop.step", "loop step is None"),
    ],
)
def test_training_state_without_what_a_resume_needs_is_refused(run, tmp_path, drop, problem):
    file = run / "checkpoints" / "step_0000002" / "state.pt"
    state = torch.load(file, weights_only=True)
    if "." in drop:
        section, key = drop.split(".")
        del state[section][key]
    else:
        del state[drop]
    torch.save(state, file)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=f"training state {file} is incomplete: {problem}"):
        train(tiny_config(tmp_path, "train.steps=4"), progress=False)
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"garbage" * 10, "is not a tread training state"),
        (b"", "is not a tread training state"),
        (_saved([1, 2]), "is incomplete: expected a dict, found list"),
        (_saved({"weights": torch.zeros(2)}), "is incomplete: no optimizer state"),
    ],
)
def test_garbage_training_state_is_not_a_tread_state(run, tmp_path, content, problem):
    file = run / "checkpoints" / "step_0000002" / "state.pt"
    file.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(tmp_path, "train.steps=4"), progress=False)
    message = str(err.value)
    assert str(file) in message and problem in message, message
    # torch's own message advises weights_only=False, i.e. running pickled code: never.
    assert "weights_only" not in message and "\n" not in message


def test_missing_training_state_and_meta_are_named(run, tmp_path):
    step_dir = run / "checkpoints" / "step_0000002"
    (step_dir / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=f"missing its training state {step_dir}/state.pt"):
        train(tiny_config(tmp_path, "train.steps=4"), progress=False)
    (step_dir / "meta.json").unlink()
    # Pointing at the step directory itself names the missing file (was: "not complete").
    with pytest.raises(CheckpointError, match=f"{step_dir} is incomplete: {step_dir}/meta.json"):
        ckpt.resolve_checkpoint(step_dir)
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        train(tiny_config(tmp_path, "train.steps=4", f"train.resume={step_dir}"), progress=False)
