"""Training loop: learning, bit-exact resume, DDP equivalence, atomic checkpoints, refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import CheckpointError, ConfigError, DataError
from tread.train import DistInfo, NonFiniteLossError, train
from tread.train import checkpoint as ckpt

TINY = [
    "model.depth=3",
    "model.width=32",
    "model.heads=2",
    "model.patch_size=2",
    "model.routes=[{start: 1, end: 1, ratio: 0.5}]",
    "train.batch_size=16",
    "train.log_every=1",
    "train.sample_every=0",
    "train.max_minutes=null",
    "sample.grid_size=10",
    "sample.steps=4",
    "ema.decay=0.99",
]


def tiny_config(tmp_path, *extra):
    return load_config("digits_tread", [*TINY, f"train.run_dir={tmp_path / 'run'}", *extra])


def weights(path):
    return load_file(str(path / "model.safetensors")), load_file(str(path / "ema.safetensors"))


def test_loss_goes_down(tmp_path):
    config = tiny_config(tmp_path, "train.steps=120", "train.ckpt_every=0", "optim.lr=2e-3")
    result = train(config, progress=False)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 120
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    # Run directory: resolved config, final checkpoint, loss curve, sample grid.
    for name in ("config.yaml", "loss.png", "samples/step_0000120.png"):
        assert (result.run_dir / name).is_file(), name
    assert result.checkpoint == result.run_dir / "checkpoints" / "step_0000120"


def test_resume_is_bit_exact(tmp_path):
    straight = train(
        tiny_config(tmp_path / "a", "train.steps=8", "train.ckpt_every=4"), progress=False
    )
    first = train(
        tiny_config(tmp_path / "b", "train.steps=4", "train.ckpt_every=4"), progress=False
    )
    assert first.step == 4
    resumed = train(
        tiny_config(tmp_path / "b", "train.steps=8", "train.ckpt_every=4"), progress=False
    )
    assert resumed.step == 8
    for a, b in zip(weights(straight.checkpoint), weights(resumed.checkpoint), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    state_a = ckpt.load_training_state(straight.checkpoint)
    state_b = ckpt.load_training_state(resumed.checkpoint)
    assert state_a["loop"]["data"] == state_b["loop"]["data"]
    for sa, sb in zip(
        state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # The metrics log reads as one run: steps 1..8 once each.
    rows = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


def test_keep_last_rotation_and_resume_none_refuses(tmp_path):
    result = train(
        tiny_config(tmp_path, "train.steps=6", "train.ckpt_every=2", "train.keep_last=2"),
        progress=False,
    )
    names = [p.name for p in ckpt.list_checkpoints(result.run_dir)]
    assert names == ["step_0000004", "step_0000006"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(tmp_path, "train.steps=8", "train.resume=none"), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == names


def test_incomplete_checkpoint_is_ignored_and_corrupt_one_refused(tmp_path):
    result = train(tiny_config(tmp_path, "train.steps=2", "train.ckpt_every=2"), progress=False)
    # A crash mid-write leaves a temporary directory without meta.json: never picked up.
    partial = result.run_dir / "checkpoints" / ".tmp_step_0000009_1"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.resolve_checkpoint(result.run_dir) == result.checkpoint
    # A corrupt weight file in a complete checkpoint is a clear error naming the file.
    (result.checkpoint / "ema.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        ckpt.load_for_inference(result.run_dir)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt.load_for_inference(tmp_path / "nowhere")


def test_nonfinite_loss_stops_without_writing(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, "train.steps=2", "train.ckpt_every=2"), progress=False)
    from tread.train import loop

    real = loop.objective_from_config

    class Exploding:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def loss_at(self, *args):
            return self.inner.loss_at(*args) * float("nan")

    monkeypatch.setattr(loop, "objective_from_config", lambda c: Exploding(real(c)))
    with pytest.raises(NonFiniteLossError, match="step 2.*step_0000002"):
        train(tiny_config(tmp_path, "train.steps=4", "train.ckpt_every=1"), progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_0000002"]


def test_missing_data_is_refused(tmp_path):
    config = tiny_config(tmp_path, "data.name=idx", f"data.path={tmp_path / 'none'}")
    with pytest.raises(DataError, match=str(tmp_path / "none")):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, config, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(config, dist=DistInfo(rank=rank, world_size=2), progress=False)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    extra = ("train.steps=3", "train.ckpt_every=3", "data.hflip=true")
    single = train(tiny_config(tmp_path / "one", *extra), progress=False)
    config = tiny_config(tmp_path / "two", *extra)
    mp.spawn(_ddp_worker, args=(config, _free_port()), nprocs=2, join=True)
    double = ckpt.resolve_checkpoint(tmp_path / "two" / "run")
    for a, b in zip(weights(single.checkpoint), weights(double), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # And the update was not trivially zero.
    start = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=1))
    assert start.train.steps == 1


def test_cli_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli_main(["train", *TINY, "train.steps=3", f"train.run_dir={run}", "--no-progress"])
    assert code == 0
    out = tmp_path / "s.png"
    assert cli_main(["sample", str(run), "--count", "6", "--steps", "3", "--out", str(out)]) == 0
    assert out.is_file()
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", str(run), "--count", "3", "--steps", "3", "--out", str(npz)]) == 0
    import numpy as np

    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
    assert cli_main(["sample", str(tmp_path / "nope")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli_main(["train", "bogus=1"]) == 2


def test_progress_total_follows_the_binding_limit():
    from tread.train.loop import _projected_steps

    tc = load_config("digits_tread").train
    # No time budget: the step count is the total.
    assert (
        _projected_steps(10, 2.0, 5.0, dataclasses.replace(tc, steps=300, max_minutes=None)) == 300
    )
    # 1 minute budget, 50 s spent at 2 it/s: 10 s left -> 20 more steps.
    timed = dataclasses.replace(tc, steps=10**7, max_minutes=1.0)
    assert _projected_steps(100, 2.0, 50.0, timed) == 120
    # The step limit binds when it comes first; an overrun budget projects no more steps.
    assert _projected_steps(100, 2.0, 50.0, dataclasses.replace(timed, steps=105)) == 105
    assert _projected_steps(100, 2.0, 70.0, timed) == 100


def test_time_budget_stops_and_logs_the_final_step(tmp_path):
    config = tiny_config(
        tmp_path, "train.steps=1000", "train.log_every=100", "train.max_minutes=0.000001"
    )
    result = train(config, progress=False)
    assert result.stopped == "time" and result.step == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
