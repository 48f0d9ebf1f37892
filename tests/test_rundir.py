"""The run directory: one training at a time, clean-up after kills, checks before writing."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from test_train import TINY, tiny_config
from tread.cli import main as cli_main
from tread.errors import ConfigError
from tread.train import checkpoint as ckpt
from tread.train import train
from tread.train.rundir import RunLock


def _hold_lock(run_dir, ready):
    RunLock(run_dir)
    ready.set()
    time.sleep(60)  # until killed


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_training_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, "train.steps=2"), progress=False)
    before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.yaml")}
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ConfigError) as err:
            train(tiny_config(tmp_path, "train.steps=4"), progress=False)
        message = str(err.value)
        assert f"train.run_dir={run} is in use" in message and f"pid {holder.pid}" in message
        assert "\n" not in message
        # The refused run changed nothing.
        assert {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.yaml")} == (
            before
        )
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops its flock; its record stays
        holder.join()
    with caplog.at_level(logging.WARNING, logger="tread.train.rundir"):
        assert train(tiny_config(tmp_path, "train.steps=4"), progress=False).step == 4
    assert f"'pid': {holder.pid}" in caplog.text and "killed" in caplog.text
    assert (run / ".lock").read_text() == ""  # a clean exit empties the record


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere"}))
    assert train(tiny_config(tmp_path, "train.steps=2"), progress=False).step == 2


def test_partial_checkpoints_of_dead_processes_are_cleaned_up_on_start(tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config(tmp_path, "train.steps=4", "train.ckpt_every=2"), progress=False)
    root = run / "checkpoints"
    dead, alive = _dead_pid(), os.getppid()
    # Killed while writing step 6, and while re-saving step 4 (between its two renames).
    (root / f".tmp_step_0000006_{dead}").mkdir()
    (root / f".tmp_step_0000006_{dead}" / "model.safetensors").write_bytes(b"x" * 100)
    (root / "step_0000004").rename(root / f".old_step_0000004_{dead}")
    (root / f".tmp_step_0000008_{alive}").mkdir()  # a live process: not ours to remove
    result = train(tiny_config(tmp_path, "train.steps=6", "train.ckpt_every=2"), progress=False)
    left = sorted(p.name for p in root.iterdir())
    assert left == [f".tmp_step_0000008_{alive}", "step_0000004", "step_0000006"]
    # The restored step-4 checkpoint was the one resumed: 4 -> 6, not 2 -> 6.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert result.checkpoint.name == "step_0000006" and first.step == 4


def test_run_dir_under_a_regular_file_is_refused_before_writing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"train.run_dir={blocker}/run: {blocker} is a file"):
        train(tiny_config(tmp_path, f"train.run_dir={blocker / 'run'}"), progress=False)
    code = cli_main(
        ["train", *TINY, "train.steps=2", f"train.run_dir={blocker}/a/b", "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tread train: error: train.run_dir=") and "\n" not in err
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("where", ["run", "checkpoints"])
def test_read_only_run_directories_are_refused_before_writing(tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, "train.steps=2"), progress=False)
    target = run if where == "run" else run / "checkpoints"
    before = sorted(p.name for p in run.rglob("*"))
    if os.geteuid() == 0:  # root ignores permissions: simulate what a user would see
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if p == target else real_access(p, mode)
        )
    else:
        target.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=f"directory {target} is not writable"):
            train(tiny_config(tmp_path, "train.steps=4"), progress=False)
    finally:
        target.chmod(0o755)
    assert sorted(p.name for p in run.rglob("*")) == before
