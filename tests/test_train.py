"""Training loop: learning, bit-exact resume, DDP equivalence, atomic checkpoints, refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import CheckpointError, ConfigError, DataError
from tread.train import DistInfo, NonFiniteLossError, train
from tread.train import checkpoint as ckpt
from tread.train.builders import build_from_config

from conftest import TINY_MODEL, ddp_train_worker, free_port

TINY = [
    *TINY_MODEL,
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
    from tread.train import setup

    real = setup.objective_from_config

    class Exploding:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def loss_at(self, *args):
            return self.inner.loss_at(*args) * float("nan")

    monkeypatch.setattr(setup, "objective_from_config", lambda c: Exploding(real(c)))
    with pytest.raises(NonFiniteLossError, match=r"steps 3\.\.3.*step_0000002"):
        train(tiny_config(tmp_path, "train.steps=4", "train.ckpt_every=1"), progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_0000002"]


def test_missing_data_is_refused(tmp_path):
    config = tiny_config(tmp_path, "data.name=idx", f"data.path={tmp_path / 'none'}")
    with pytest.raises(DataError, match=str(tmp_path / "none")):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def _ddp_timed_worker(rank, config, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(config, dist=DistInfo(rank=rank, world_size=2), progress=False)
    out.put((rank, result.step, result.stopped))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stop_together_on_a_time_budget(tmp_path):
    """Each rank reads its own clock; the host-side all_true makes them stop at one step."""
    config = tiny_config(tmp_path, "train.steps=100000", "train.max_minutes=0.02")
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_timed_worker, args=(config, free_port(), out), nprocs=2, join=True)
    results = sorted(out.get() for _ in range(2))
    assert results[0][1:] == results[1][1:] and results[0][2] == "time"
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == f"step_{results[0][1]:07d}"


def test_two_process_gloo_matches_one_process(tmp_path):
    extra = ("train.steps=3", "train.ckpt_every=3", "data.hflip=true")
    single = train(tiny_config(tmp_path / "one", *extra), progress=False)
    config = tiny_config(tmp_path / "two", *extra)
    mp.spawn(ddp_train_worker, args=(config, free_port()), nprocs=2, join=True)
    double = ckpt.resolve_checkpoint(tmp_path / "two" / "run")
    assert double.name == "step_0000003"
    for a, b in zip(weights(single.checkpoint), weights(double), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # And the update was not trivially zero: both models moved away from the initial weights
    # (a run whose ranks never stepped, or stepped with zero gradients, would match too).
    # Adam's first updates move a weight by about the learning rate, so the largest move is
    # about the sum of the (warm-up) rates of the 3 steps.
    optim = single.config.optim
    lr_sum = sum(optim.lr * min(1.0, (s + 1) / optim.warmup_steps) for s in range(3))
    initial = build_from_config(single.config).state_dict()
    for trained in weights(double):  # model, then EMA
        moved = [k for k in initial if not torch.equal(initial[k], trained[k])]
        assert len(moved) > 0.9 * len(initial), sorted(set(initial) - set(moved))
        largest = max((initial[k] - trained[k]).abs().max().item() for k in moved)
        assert 0.5 * lr_sum < largest < 1.5 * lr_sum, (largest, lr_sum)


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
    from tread.train.state import projected_steps as _projected_steps

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


# --- Synchronisation, non-finite steps, ordering of side work (issue 9, items 6/7/17/18/22) ---


class _ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python scalar reads (item/float/bool: a device->host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _paused(probe, fn):
    def run(*args, **kwargs):
        probe.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            probe.paused = False

    return run


def test_ordinary_steps_do_not_read_tensors_to_the_host(tmp_path, monkeypatch):
    from tread.train import loop
    from tread.train.state import LossWindow

    probe = _ScalarReads()
    # AdamW reads its CPU step counters (host memory even on a GPU), and data loading checks
    # labels once: neither is a per-step device sync.
    monkeypatch.setattr(torch.optim.AdamW, "step", _paused(probe, torch.optim.AdamW.step))
    monkeypatch.setattr(loop, "prepare_run", _paused(probe, loop.prepare_run))
    reads = []
    real_read = LossWindow.read
    monkeypatch.setattr(
        LossWindow, "read", lambda self, info: reads.append(1) or real_read(self, info)
    )
    config = tiny_config(
        tmp_path, "train.steps=10", "train.log_every=5", "train.ckpt_every=0", "optim.grad_clip=1"
    )
    with probe:
        result = train(config, progress=False)
    assert probe.count == 0  # before: bool(isfinite(loss)), float(grad norm), float(loss) a step
    assert len(reads) == 2  # the sync steps: 5 (log) and 10 (log, last)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


def _nan_at(monkeypatch, bad_calls):
    """Make the objective's loss NaN at the given 0-based calls (= steps of a fresh run)."""
    from tread.train import setup

    real = setup.objective_from_config
    calls = []

    class Exploding:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def loss_at(self, *args):
            calls.append(1)
            loss = self.inner.loss_at(*args)
            return loss * float("nan") if len(calls) - 1 in bad_calls else loss

    monkeypatch.setattr(setup, "objective_from_config", lambda c: Exploding(real(c)))


@pytest.mark.parametrize(
    "log_every, ckpt_every, bad_call, steps_named, kept",
    [
        (4, 4, 5, "5..8", ["step_0000004"]),  # found at the next log, the step-8 save skipped
        (4, 1, 2, "3..3", ["step_0000001", "step_0000002"]),  # checked before every save
    ],
)
def test_nonfinite_step_stops_at_the_next_sync_without_saving(
    tmp_path, monkeypatch, log_every, ckpt_every, bad_call, steps_named, kept
):
    _nan_at(monkeypatch, {bad_call})
    config = tiny_config(
        tmp_path, "train.steps=12", f"train.log_every={log_every}", f"train.ckpt_every={ckpt_every}"
    )
    with pytest.raises(NonFiniteLossError, match=rf"steps {steps_named}\b.*{kept[-1]}"):
        train(config, progress=False)
    checkpoints = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == kept
    for tensors in weights(checkpoints[-1]):
        assert all(torch.isfinite(t).all() for t in tensors.values())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < int(steps_named.split("..")[0]) for r in rows)
    # The last good checkpoint resumes (the lock was released by the failed run).
    monkeypatch.undo()
    assert train(config, progress=False).step == 12


def test_pick_device_makes_the_local_rank_current(monkeypatch):
    from tread.train.setup import pick_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    info = DistInfo(rank=5, world_size=8, local_rank=2)
    assert pick_device("auto", info) == torch.device("cuda", 2)
    assert pick_device("cuda", info) == torch.device("cuda", 2)
    assert current == [2, 2]
    assert pick_device("cpu", info) == torch.device("cpu")
    with pytest.raises(ConfigError, match="local rank 4 but only 4 CUDA devices"):
        pick_device("cuda", DistInfo(rank=4, world_size=8, local_rank=4))


def test_checkpoint_is_saved_before_the_evaluation_of_its_step(tmp_path):
    calls = []

    def hook(step, model, config):
        calls.append((step, type(model).__name__, config.model.input_size))
        if step == 4:
            raise RuntimeError("evaluation failed")
        return {"fd": 1.5}

    config = tiny_config(tmp_path, "train.steps=6", "train.ckpt_every=2", "eval.every=2")
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(config, eval_hook=hook, progress=False)
    assert [c[0] for c in calls] == [2, 4] and calls[0][2] == 8  # the resolved config
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_0000002", "step_0000004"]  # step 4 was saved before its evaluation
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/fd" in r] == [2]


def test_resume_refuses_changed_settings_unless_accepted(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, "train.steps=2", "optim.lr=1e-3"), progress=False)
    saved_yaml = (run / "config.yaml").read_text()
    changed = tiny_config(tmp_path, "train.steps=4", "optim.lr=2e-3", "ema.decay=0.9")
    with pytest.raises(ConfigError) as err:
        train(changed, progress=False)
    message = str(err.value)
    assert "\n" not in message and "step_0000002" in message
    assert "ema.decay: 0.99 -> 0.9, optim.lr: 0.001 -> 0.002" in message
    assert "train.steps" not in message  # more steps is what a resume is for
    assert (run / "config.yaml").read_text() == saved_yaml
    assert not (run / "config_changes.jsonl").exists()
    assert ckpt.list_checkpoints(run)[-1].name == "step_0000002"

    result = train(changed, progress=False, allow_changes=True)
    assert result.step == 4
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    [row] = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["checkpoint"].endswith("step_0000002")
    assert row["changes"]["optim.lr"] == [0.001, 0.002]
    assert row["changes"]["train.steps"] == [2, 4]


def test_training_phases_are_short_functions():
    import ast
    import inspect

    from tread.train import loop, setup, state

    for module in (loop, setup, state):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, (module.__name__, node.name, length)


def test_clock_stamp_never_puts_training_time_past_elapsed():
    from tread.train.state import Clock

    clock = Clock(elapsed=5.0, side=0.0)  # no side work yet: the two must be equal
    for _ in range(100):
        stamp = clock.stamp()
        assert stamp["elapsed_s"] == stamp["train_s"] >= 5.0


def test_resume_accepts_a_checkpoint_saved_before_architecture_fields_were_resolved(tmp_path):
    """Older checkpoints hold ``model.depth: null`` where the registry's value applied."""
    import json

    cfg = tiny_config(
        tmp_path / "old", "train.steps=2", "train.ckpt_every=2", "model.mlp_ratio=null"
    )
    first = train(cfg, progress=False)
    file = first.checkpoint / "config.json"
    saved = json.loads(file.read_text())
    assert saved["model"]["mlp_ratio"] == 4.0  # resolved from the registry when saved
    saved["model"]["mlp_ratio"] = None  # as the code before the resolved config wrote it
    file.write_text(json.dumps(saved))
    resumed = train(tiny_config(tmp_path / "old", "train.steps=3"), progress=False)
    assert resumed.step == 3


# --- Dense fine-tune phase (issue 12, item 5) -------------------------------------------------

FINETUNE = ("optim.lr=1e-3", "optim.warmup_steps=0", "train.finetune_lr=1e-5")


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_phase_runs_dense_at_its_rate_and_shows_in_metrics_and_plot(
    tmp_path, monkeypatch, caplog
):
    from matplotlib.axes import Axes

    from tread.models.backbone import RoutableBackbone

    calls, lines = [], []
    real_forward, real_axvline = RoutableBackbone.forward, Axes.axvline

    def forward(self, x, t, y, *, routes=None, generator=None, plans=None):
        if self.training:
            calls.append((tuple(routes), None if plans is None else plans[0].keep.shape[1]))
        return real_forward(self, x, t, y, routes=routes, generator=generator, plans=plans)

    monkeypatch.setattr(RoutableBackbone, "forward", forward)
    monkeypatch.setattr(
        Axes, "axvline", lambda ax, x, **kw: lines.append(x) or real_axvline(ax, x, **kw)
    )
    config = tiny_config(tmp_path, "train.steps=5", "train.finetune_from=3", *FINETUNE)
    with caplog.at_level("INFO", logger="tread.train.loop"):
        result = train(config, progress=False)
    routed = (result.config.routes()[0].resolve(3),)
    # Steps 0..2 routed with 8 of 16 tokens kept; steps 3, 4 dense: no routes, no plans.
    assert calls == [(routed, 8)] * 3 + [((), None)] * 2
    rows = _rows(result.run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["phase"] for r in train_rows] == ["routed"] * 3 + ["finetune"] * 2
    assert [r["lr"] for r in train_rows] == [1e-3] * 3 + [1e-5] * 2
    [event] = [r for r in rows if "event" in r]
    assert event["event"] == "finetune_start" and event["step"] == 3 and event["lr"] == 1e-5
    assert rows.index(event) == 3  # after the row of step 3 (the last routed step's)
    assert "dense fine-tune phase starts: routing off, learning rate 1e-05" in caplog.text
    assert lines == [3]  # the loss plot marks the switch
    assert (result.run_dir / "loss.png").is_file()


def test_finetune_without_its_own_rate_keeps_the_schedule_of_optim_lr():
    from tread.train.phases import learning_rate

    config = load_config(
        "digits_tread", ["optim.lr=1e-3", "optim.warmup_steps=10", "train.finetune_from=5"]
    )
    assert [learning_rate(config, s) for s in (4, 5, 9, 20)] == pytest.approx(
        [5e-4, 6e-4, 1e-3, 1e-3]
    )
    tuned = dataclasses.replace(config, train=dataclasses.replace(config.train, finetune_lr=1e-5))
    assert [learning_rate(tuned, s) for s in (4, 5, 20)] == pytest.approx([5e-4, 1e-5, 1e-5])


@pytest.fixture(scope="module")
def straight_finetune(tmp_path_factory):
    """8 uninterrupted steps, dense from step 4 (the reference of the resume tests)."""
    root = tmp_path_factory.mktemp("straight")
    return train(
        tiny_config(root, "train.steps=8", "train.finetune_from=4", *FINETUNE), progress=False
    )


def _resume_before_the_switch(tmp_path):
    # A routed run, fine-tuned later: the switch is added at resume (allowed without asking).
    train(tiny_config(tmp_path, "train.steps=2", *FINETUNE[:2]), progress=False)


def _resume_at_the_switch(tmp_path):
    # Killed after the first dense step began (its event row written) but before the step-5
    # checkpoint: the resume from step 4 must not log the switch twice.
    train(
        tiny_config(
            tmp_path, "train.steps=5", "train.ckpt_every=4", "train.finetune_from=4", *FINETUNE
        ),
        progress=False,
    )
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000005")


def _resume_after_the_switch(tmp_path):
    train(
        tiny_config(tmp_path, "train.steps=6", "train.finetune_from=4", *FINETUNE), progress=False
    )


@pytest.mark.parametrize(
    "first", [_resume_before_the_switch, _resume_at_the_switch, _resume_after_the_switch]
)
def test_resume_across_the_finetune_switch_is_bit_exact(tmp_path, straight_finetune, first):
    first(tmp_path)
    resumed = train(
        tiny_config(tmp_path, "train.steps=8", "train.finetune_from=4", *FINETUNE), progress=False
    )
    for a, b in zip(
        weights(straight_finetune.checkpoint), weights(resumed.checkpoint), strict=True
    ):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    state_a = ckpt.load_training_state(straight_finetune.checkpoint)
    state_b = ckpt.load_training_state(resumed.checkpoint)
    for sa, sb in zip(
        state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    clocks = ("it_s", "img_s", "elapsed_s", "train_s")
    rows = [
        [{k: v for k, v in r.items() if k not in clocks} for r in _rows(run.run_dir)]
        for run in (straight_finetune, resumed)
    ]
    if first is _resume_before_the_switch:  # its first 2 rows predate the phase's config
        for row in rows[0][:2]:
            del row["phase"]
    assert rows[0] == rows[1]  # losses, rates, phases and the one switch row alike


def test_changing_the_finetune_phase_once_it_has_begun_is_refused(tmp_path):
    run = tmp_path / "run"
    train(
        tiny_config(tmp_path, "train.steps=4", "train.finetune_from=2", *FINETUNE), progress=False
    )
    for change in (
        ("train.finetune_from=3",),
        ("train.finetune_lr=2e-5",),
        ("train.finetune_from=null", "train.finetune_lr=null"),
    ):
        config = tiny_config(tmp_path, "train.steps=6", "train.finetune_from=2", *FINETUNE, *change)
        with pytest.raises(ConfigError, match="dense fine-tune phase has begun") as err:
            train(config, progress=False)
        assert "\n" not in str(err.value) and "train.finetune_" in str(err.value)
    assert ckpt.list_checkpoints(run)[-1].name == "step_0000004"
    # Accepted explicitly, the change is recorded.
    moved = tiny_config(tmp_path, "train.steps=6", "train.finetune_from=3", *FINETUNE)
    assert train(moved, progress=False, allow_changes=True).step == 6
    [row] = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert row["changes"]["train.finetune_from"] == [2, 3]


def test_a_switch_before_the_checkpoint_is_refused_but_one_ahead_is_not(tmp_path):
    train(tiny_config(tmp_path, "train.steps=4", *FINETUNE[:2]), progress=False)
    past = tiny_config(tmp_path, "train.steps=6", "train.finetune_from=3", *FINETUNE)
    with pytest.raises(ConfigError, match=r"train.finetune_from: None -> 3.*has begun or would"):
        train(past, progress=False)
    # A switch still ahead may be planned, then moved, without --allow-changes.
    ahead = tiny_config(tmp_path, "train.steps=5", "train.finetune_from=5", *FINETUNE)
    assert train(ahead, progress=False).step == 5
    later = tiny_config(tmp_path, "train.steps=7", "train.finetune_from=6", *FINETUNE)
    assert train(later, progress=False).step == 7
    rows = [r for r in _rows(tmp_path / "run") if "loss" in r]
    assert [r.get("phase") for r in rows] == [None] * 4 + ["routed"] * 2 + ["finetune"]


def test_a_finished_routed_run_is_fine_tuned_from_its_last_step(tmp_path):
    """The user's path to the paper's "(F)": no --allow-changes needed."""
    train(tiny_config(tmp_path, "train.steps=4", *FINETUNE[:2]), progress=False)
    tuned = tiny_config(tmp_path, "train.steps=6", "train.finetune_from=4", *FINETUNE)
    result = train(tuned, progress=False)
    assert result.step == 6
    rows = _rows(result.run_dir)
    assert [(r["step"], r.get("phase"), r["lr"]) for r in rows[4:]] == [
        (4, None, 1e-5),  # the switch row
        (5, "finetune", 1e-5),
        (6, "finetune", 1e-5),
    ]
    [change] = [json.loads(x) for x in (result.run_dir / "config_changes.jsonl").open()]
    assert change["changes"]["train.finetune_from"] == [None, 4]


@pytest.mark.parametrize(
    "saved, new, step, locked",
    [
        (None, None, 10, False),
        (None, 10, 10, False),  # fine-tune a finished run from its last step
        (None, 9, 10, True),  # a switch in the past
        (12, 15, 10, False),  # still ahead: move it
        (10, 12, 10, False),  # the switch is at the checkpoint: no dense step ran yet
        (8, 8, 10, True),  # begun: its start and rate are history
        (8, None, 10, True),
    ],
)
def test_finetune_locked(saved, new, step, locked):
    from tread.train.rundir import FINETUNE_KEYS, finetune_locked

    def config(start):
        extra = [] if start is None else [f"train.finetune_from={start}"]
        return load_config("digits_tread", extra)

    assert finetune_locked(config(saved), config(new), step) == (
        frozenset(FINETUNE_KEYS) if locked else frozenset()
    )


def test_two_processes_match_one_along_a_schedule_and_across_the_switch(tmp_path):
    """Each step's kept count is the same on every rank (one ratio per step, global draws)."""
    extra = (
        "train.steps=4",
        "model.routes.0.schedule=linear",
        "model.routes.0.ratio_final=0.75",
        "train.finetune_from=3",
        *FINETUNE,
    )
    single = train(tiny_config(tmp_path / "one", *extra), progress=False)
    mp.spawn(ddp_train_worker, args=(tiny_config(tmp_path / "two", *extra), free_port()), nprocs=2)
    double = ckpt.resolve_checkpoint(tmp_path / "two" / "run")
    for a, b in zip(weights(single.checkpoint), weights(double), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = [r for r in _rows(single.run_dir) if "loss" in r]
    assert [r["kept/0"] for r in rows] == [8, 7, 6, 16]  # ratio 0.5 -> 0.75 over 4, then dense
    assert _rows(tmp_path / "two" / "run") != []
