"""FSDP2 (``train.parallel=fsdp``): the DDP update, sharded resumable checkpoints, 1-process loads.

Every 2-rank run of this file happens in ONE pair of gloo processes (the ``runs`` fixture): a
process pair costs more to start than these tiny runs cost to train.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import CheckpointError
from tread.train import DistInfo, load_for_inference, train
from tread.train import checkpoint as ckpt
from tread.train.setup import check_batch_split

from conftest import TINY_RUN, free_port

# grad_clip: clipping runs on sharded gradients, and the logged norm catches a wrongly scaled
# gradient that Adam's update alone would hide.
STEPS = (
    "train.steps=4",
    "train.ckpt_every=2",
    "eval.every=4",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",  # full-size updates from the first step: differences show
    "optim.grad_clip=1",
)
FSDP = "train.parallel=fsdp"
INIT = ("train.steps=2", "eval.every=0")


def tiny_config(run_dir, *extra):
    return load_config("digits_tread", [*TINY_RUN, f"train.run_dir={run_dir}", *STEPS, *extra])


def step_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:07d}"


def init_file(run_dir):
    """One weight file for model and EMA: the init_from branch that copies model to EMA."""
    return step_dir(run_dir, 4) / "model.safetensors"


def plain_ema_hook(step, model, config):
    """Eval hook: the EMA it is given must be a plain module on every rank; logs its output on
    fixed inputs (weights and buffers)."""
    from torch.distributed.tensor import DTensor

    assert not any(isinstance(p, DTensor) for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        return {"ema_out": float(model(x, t, y).double().square().sum())}


def worker(rank, configs, port, world_size=2):
    """``mp.spawn`` target: rank ``rank`` of a gloo group trains each config in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for config in configs:  # the process group outlives each run: joined once, reused
        info = DistInfo(rank=rank, world_size=world_size)
        train(config, dist=info, eval_hook=plain_ema_hook)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run dirs of 2-rank runs of 4 steps (checkpoints at 2 and 4): DDP; FSDP; FSDP resumed at
    step 2; FSDP with 2 micro-batches; FSDP with activation checkpointing; FSDP resumed from
    DDP's step-2 checkpoint and back; a 2-step FSDP run initialised from DDP's weights."""
    root = tmp_path_factory.mktemp("fsdp")
    names = ("ddp", "fsdp", "resumed", "accum", "checkpointed", "from_ddp", "to_ddp", "init")
    dirs = {name: root / name for name in names}
    configs = [
        tiny_config(dirs["ddp"]),
        tiny_config(dirs["fsdp"], FSDP),
        tiny_config(dirs["resumed"], FSDP, f"train.resume={step_dir(dirs['fsdp'], 2)}"),
        tiny_config(dirs["accum"], FSDP, "train.grad_accum=2"),
        tiny_config(dirs["checkpointed"], FSDP, "train.activation_checkpointing=true"),
        tiny_config(dirs["from_ddp"], FSDP, f"train.resume={step_dir(dirs['ddp'], 2)}"),
        tiny_config(dirs["to_ddp"], f"train.resume={step_dir(dirs['fsdp'], 2)}"),
        tiny_config(dirs["init"], FSDP, *INIT, f"train.init_from={init_file(dirs['ddp'])}"),
    ]
    mp.spawn(worker, args=(configs, free_port()), nprocs=2, join=True)
    return dirs


def rows(run_dir, key):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(row["step"], row[key]) for row in map(json.loads, lines) if key in row]


def weights(run_dir, name="model", step=4):
    return load_file(str(step_dir(run_dir, step) / f"{name}.safetensors"))


def assert_same(a, b, rtol=1e-4, atol=2e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def assert_same_curve(run_dir, reference, key):
    curve = rows(run_dir, key)
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(rows(reference, key), curve, strict=True):
        assert b == pytest.approx(a, rel=1e-5), key


def test_fsdp_trains_like_ddp(runs):
    """Same loss curve, weights, EMA and in-loop evaluation; the checkpoint is sharded."""
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert_same_curve(fsdp, ddp, "loss")
    assert_same_curve(fsdp, ddp, "grad_norm")
    for name in ("model", "ema"):
        assert_same(weights(fsdp, name), weights(ddp, name))
    # The eval hook got the whole EMA on both ranks (the hook asserts it is plain).
    [(_, out_ddp)] = rows(ddp, "eval/ema_out")
    [(_, out_fsdp)] = rows(fsdp, "eval/ema_out")
    assert out_fsdp == pytest.approx(out_ddp, rel=1e-5)
    assert (fsdp / "samples" / "step_0000004.png").is_file()  # the grid of the gathered EMA
    checkpoint = step_dir(fsdp, 4)
    assert sorted(p.name for p in (checkpoint / ckpt.SHARDED_DIR).iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert ckpt.read_meta(checkpoint)["parallel"] == "fsdp"
    assert "optimizer" not in ckpt.load_training_state(checkpoint)
    assert not ckpt.is_sharded_checkpoint(step_dir(ddp, 4))
    # Not trivially equal: training moved the weights.
    assert any(not torch.equal(weights(fsdp)[k], weights(fsdp, step=2)[k]) for k in weights(fsdp))


def test_fsdp_resumes_from_its_sharded_checkpoint(runs):
    """Checkpoint at step 2, resume under FSDP to step 4 = the uninterrupted FSDP run."""
    resumed, fsdp = runs["resumed"], runs["fsdp"]
    assert [step for step, _ in rows(resumed, "loss")] == [3, 4]
    assert rows(resumed, "loss") == rows(fsdp, "loss")[2:]
    for name in ("model", "ema"):
        assert_same(weights(resumed, name), weights(fsdp, name), rtol=0, atol=0)


def test_fsdp_checkpoint_loads_in_one_process(runs, tmp_path):
    """load_for_inference reads an FSDP checkpoint as any other, and one process resumes from its
    shards (DCP resharding 2 ranks -> 1): the same run as 2 ranks uninterrupted."""
    model, config, step = load_for_inference(runs["fsdp"])
    assert step == 4 and config.train.parallel == "fsdp"
    state = {k: v for k, v in model.state_dict().items() if k in weights(runs["ddp"])}
    assert_same(state, weights(runs["ddp"], "ema"))
    single = train(
        tiny_config(tmp_path / "single", FSDP, f"train.resume={step_dir(runs['fsdp'], 2)}"),
        progress=False,
    )
    assert single.step == 4
    for name in ("model", "ema"):
        assert_same(weights(single.run_dir, name), weights(runs["fsdp"], name))
    # The optimizer state came from the shards too (the full weights alone would not give it).
    saved = ckpt.load_training_state(step_dir(runs["ddp"], 4))["optimizer"]["state"]
    mine = ckpt.load_training_state(step_dir(single.run_dir, 4))["optimizer"]["state"]
    for index in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            expected = saved[index][key]
            scale = float(expected.abs().max())  # moments may be ~1e-14: tolerances to scale
            torch.testing.assert_close(mine[index][key], expected, rtol=1e-3, atol=1e-4 * scale)


def test_fsdp_with_micro_batches(runs):
    """grad_accum=2 under FSDP (reduce-scatter every micro-batch): DDP's update and batch loss
    and gradient norm."""
    assert_same(weights(runs["accum"]), weights(runs["ddp"]))
    assert_same_curve(runs["accum"], runs["ddp"], "loss")
    assert_same_curve(runs["accum"], runs["ddp"], "grad_norm")


def test_fsdp_with_activation_checkpointing(runs):
    """Blocks recomputed in the backward pass (inside FSDP's per-block units): the same run."""
    for kind in ("model", "ema"):
        assert_same(weights(runs["checkpointed"], kind), weights(runs["fsdp"], kind))
    assert_same_curve(runs["checkpointed"], runs["fsdp"], "grad_norm")


def test_a_run_switches_between_ddp_and_fsdp(runs, tmp_path):
    """DDP checkpoint resumed under FSDP and FSDP's under DDP: each continues the same run;
    train.init_from under FSDP loads what one process does."""
    for name, switch in (("from_ddp", '["ddp", "fsdp"]'), ("to_ddp", '["fsdp", "ddp"]')):
        for kind in ("model", "ema"):
            assert_same(weights(runs[name], kind), weights(runs["ddp"], kind))
        changes = (runs[name] / "config_changes.jsonl").read_text()
        assert f'"train.parallel": {switch}' in changes
    init = f"train.init_from={init_file(runs['ddp'])}"
    single = train(tiny_config(tmp_path / "init", *INIT, init), progress=False)
    for kind in ("model", "ema"):
        assert_same(weights(runs["init"], kind, step=2), weights(single.run_dir, kind, step=2))
    fresh, loaded = weights(runs["ddp"], step=2), weights(runs["init"], step=2)
    assert any(not torch.allclose(fresh[k], loaded[k]) for k in fresh)  # init_from mattered


def test_damaged_shards_are_a_one_line_error(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run_dir)
    shard = step_dir(run_dir, 4) / ckpt.SHARDED_DIR / "__1_0.distcp"
    shard.unlink()
    config = tiny_config(run_dir, FSDP, "train.steps=6")
    with pytest.raises(CheckpointError, match=r"sharded checkpoint .*sharded cannot be loaded"):
        train(config, progress=False)
    state = step_dir(run_dir, 4) / "state.pt"
    torch.save({"loop": {}}, state)
    with pytest.raises(CheckpointError, match=r"state.pt is incomplete: loop step is None"):
        train(config, progress=False)


def test_the_start_line_says_what_is_sharded(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path / "run", FSDP, "train.grad_accum=2")
    assert check_batch_split(config.train, 2).endswith(
        "; fsdp: parameters, gradients, optimizer state and EMA sharded over 2 ranks"
    )
    assert check_batch_split(config.train, 1).endswith(
        "; fsdp with one process: the plain model, nothing to shard"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--dry-run", *TINY_RUN, f"train.run_dir={tmp_path / 'run'}", FSDP]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "# global batch 16 = 2 rank(s) x 1 micro-batch(es) x 8 samples; one optimizer update "
        "per 1 forward/backward pass(es); fsdp: parameters, gradients, optimizer state and EMA "
        "sharded over 2 ranks"
    )
    assert not (tmp_path / "run").exists()


def test_the_root_output_is_never_a_view():
    """FSDP hangs its pre-backward hook on the model's output; a view (unpatchify at patch
    size 1) would let an in-place op drop it, so the root hook hands out a tensor of its own."""
    from tread.train.fsdp import _own_output

    base = torch.arange(8.0).reshape(2, 4)
    view = base.view(2, 2, 2)
    owned = _own_output(None, (), view)
    assert not owned._is_view() and torch.equal(owned, view)
    plain = torch.ones(3)
    assert _own_output(None, (), plain) is plain  # no copy when there is nothing to fix


def test_two_rank_shards_resume_on_four_ranks(runs, tmp_path):
    """DCP reshards: the 2-rank FSDP checkpoint of step 2, resumed by 4 FSDP ranks, continues
    the run (the 2-rank DDP run's losses and weights at step 4)."""
    run_dir = tmp_path / "four"
    config = tiny_config(run_dir, FSDP, f"train.resume={step_dir(runs['fsdp'], 2)}")
    mp.spawn(worker, args=([config], free_port(), 4), nprocs=4, join=True)
    for (step, a), (_, b) in zip(rows(runs["ddp"], "loss")[2:], rows(run_dir, "loss"), strict=True):
        assert b == pytest.approx(a, rel=1e-5), step
    assert_same(weights(run_dir), weights(runs["ddp"]))
    assert_same(weights(run_dir, "ema"), weights(runs["ddp"], "ema"))
