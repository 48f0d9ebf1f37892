"""Gradient accumulation (``train.grad_accum``): the update of the whole global batch at once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import ConfigError
from tread.train import checkpoint as ckpt
from tread.train import train

from conftest import TINY_RUN, ddp_train_worker, free_port

TINY = TINY_RUN


def tiny_config(run_dir, *extra):
    return load_config("digits_tread", [*TINY, f"train.run_dir={run_dir}", *extra])


def model_weights(run_dir):
    return load_file(str(ckpt.resolve_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-6, msg=key)


def test_micro_batches_and_ranks_give_the_one_big_batch_update(tmp_path):
    """1 process x full batch = 1 process x 4 micro-batches = 2 gloo ranks x 2 micro-batches."""
    extra = ("train.steps=3", "train.ckpt_every=3", "optim.lr=1e-3")
    full = train(tiny_config(tmp_path / "full", *extra), progress=False)
    train(tiny_config(tmp_path / "four", *extra, "train.grad_accum=4"), progress=False)
    ddp = tiny_config(tmp_path / "ddp", *extra, "train.grad_accum=2")
    mp.spawn(ddp_train_worker, args=(ddp, free_port()), nprocs=2, join=True)
    reference = model_weights(full.run_dir)
    assert_same_weights(model_weights(tmp_path / "four"), reference)
    assert_same_weights(model_weights(tmp_path / "ddp"), reference)
    # Not trivially equal: a quarter of the batch per update gives another model.
    train(tiny_config(tmp_path / "small", *extra, "train.batch_size=4"), progress=False)
    small = model_weights(tmp_path / "small")
    assert any(not torch.allclose(small[k], reference[k], atol=1e-5) for k in reference)


def test_the_logged_loss_and_gradient_norm_are_those_of_the_batch(tmp_path):
    """Adam barely sees a gradient's scale, so the weights alone would not catch micro-batch
    gradients summed instead of averaged: the logged gradient norm does."""
    extra = ("train.steps=2", "train.ckpt_every=0", "optim.grad_clip=1e6")
    logged = []
    for name, accum in (("one", 1), ("two", 2)):
        config = tiny_config(tmp_path / name, *extra, f"train.grad_accum={accum}")
        run = train(config, progress=False)
        lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"loss"' in line]
        logged.append([(row["loss"], row["grad_norm"]) for row in rows])
    assert len(logged[0]) == 2
    for (loss, norm), (loss_acc, norm_acc) in zip(*logged, strict=True):
        assert loss_acc == pytest.approx(loss, rel=1e-5)
        assert norm_acc == pytest.approx(norm, rel=1e-4)


def test_a_run_resumes_with_another_accumulation(tmp_path):
    """Moving to fewer GPUs: same global batch, more micro-batches; it continues the same run."""
    extra = ("train.steps=4", "train.ckpt_every=2")
    whole = train(tiny_config(tmp_path / "whole", *extra), progress=False)
    run_dir = tmp_path / "split"
    train(tiny_config(run_dir, "train.steps=2", "train.ckpt_every=2"), progress=False)
    resumed = train(tiny_config(run_dir, *extra, "train.grad_accum=4"), progress=False)
    assert resumed.step == 4
    assert_same_weights(model_weights(run_dir), model_weights(whole.run_dir))


def test_bad_splits_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.batch_size=16 is not divisible by train.grad_"):
        tiny_config(tmp_path, "train.grad_accum=3")
    with pytest.raises(ConfigError, match=r"train.grad_accum"):
        tiny_config(tmp_path, "train.grad_accum=0")
    # 2 ranks x 16 micro-batches do not divide 16: refused before anything is written.
    config = tiny_config(tmp_path / "run", "train.grad_accum=16")
    from tread.train.setup import check_batch_split

    with pytest.raises(ConfigError, match=r"not divisible by 2 rank\(s\) x train.grad_accum=16"):
        check_batch_split(config.train, 2)
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_batch_arithmetic(tmp_path, capsys, monkeypatch):
    args = ["train", "--dry-run", *TINY, f"train.run_dir={tmp_path / 'run'}", "train.grad_accum=2"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "# global batch 16 = 1 rank(s) x 2 micro-batch(es) x 8 samples; "
        "one optimizer update per 2 forward/backward pass(es)"
    )
    assert yaml.safe_load(out)["train"]["grad_accum"] == 2  # still a loadable config
    monkeypatch.setenv("WORLD_SIZE", "4")  # as under torchrun: 16 = 4 x 2 x 2
    assert cli_main(args) == 0
    assert "= 4 rank(s) x 2 micro-batch(es) x 2 samples" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert cli_main(args) == 2
    assert "not divisible by 16 rank(s) x train.grad_accum=2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
