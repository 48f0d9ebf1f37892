"""End-to-end evaluation: a trained tiny model beats noise; ``tread eval`` and in-loop eval."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tread.cli import main as cli_main
from tread.config import load_config
from tread.errors import ConfigError, DataError
from tread.eval import (
    FeatureStats,
    compute_metrics,
    load_classifier,
    quantize_uint8,
    reference_stats,
    save_stats,
)
from tread.train import load_for_inference, train
from tread.train.evaluation import default_eval_hook, generate_images

SMALL = [
    "model.depth=4",
    "model.width=64",
    "model.heads=4",
    "model.patch_size=2",
    "model.routes=[{start: 1, end: 2, ratio: 0.5}]",
    "train.batch_size=32",
    "train.steps=300",
    "train.log_every=50",
    "train.sample_every=0",
    "train.ckpt_every=0",
    "train.max_minutes=null",
    "optim.lr=2e-3",
    "optim.warmup_steps=20",
    "ema.decay=0.99",
    "eval.every=150",
    "eval.num_samples=100",
    "sample.steps=8",
    "sample.grid_size=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    config = load_config("digits_tread", [*SMALL, f"train.run_dir={run}"])
    result = train(config, eval_hook=default_eval_hook(config), progress=False)
    return result


def test_in_loop_evaluation_is_logged_against_step_and_time(trained):
    rows = [json.loads(x) for x in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fd" in r]
    assert [r["step"] for r in evals] == [150, 300]
    assert all(r["train_s"] > 0 and r["elapsed_s"] >= r["train_s"] for r in evals)
    assert all(0 <= r["eval/acc"] <= 1 for r in evals)


def test_trained_tiny_model_scores_better_than_noise(trained):
    model, config, step = load_for_inference(trained.run_dir)
    assert step == 300
    net = load_classifier("digits")
    reference = reference_stats("digits", "test", net)
    images, labels = generate_images(model, config, 200, seed=0, device=torch.device("cpu"))
    fake = compute_metrics(images, net, reference, labels=labels, metrics=("fd", "acc"))
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    baseline = compute_metrics(noise, net, reference, labels=labels, metrics=("fd", "acc"))
    assert fake["fd"] < 0.5 * baseline["fd"], (fake, baseline)
    # (300 tiny steps learn the digit shapes, not yet the class conditioning: accuracy is
    # checked on the main job, see the README.)


def test_eval_command_writes_reproducible_record(trained, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = [
        "eval",
        str(trained.run_dir),
        "--num-samples",
        "60",
        "--steps",
        "6",
        "--metrics",
        "fd,kid,pr,is,acc",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 300 | FD ") and "seed=3" in line
    record = json.loads(out.read_text())
    assert record["sampler"] == "edm_heun" and record["steps"] == 6 and record["seed"] == 3
    assert record["fd_is"] == "FD" and record["num_samples"] == 60
    assert {"fd", "kid_mean", "precision", "recall", "is_mean", "acc"} <= set(record["metrics"])
    # Same command, same numbers: per-sample seeds make the record reproducible.
    assert cli_main([*args[:-1], str(tmp_path / "f.json")]) == 0
    again = json.loads((tmp_path / "f.json").read_text())
    assert again["metrics"]["fd"] == pytest.approx(record["metrics"]["fd"], rel=1e-9)


def _strict_json(path):
    """Parse as strict JSON: NaN / Infinity (which json.dumps writes by default) are errors."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_command_default_record_survives_rotation_and_says_what_was_compared(
    trained, capsys, caplog
):
    args = ["eval", str(trained.run_dir), "--num-samples", "50", "--steps", "4", "--seed", "1"]
    assert cli_main([*args, "--metrics", "fd,acc"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")[-1])
    # Under RUN_DIR/eval, not inside checkpoints/step_*/ that rotation deletes.
    assert out.parent == trained.run_dir / "eval"
    assert out.name == "step0000300_digits_classifier_n50_edm_heun4_g1_s1_ref-test.json"
    record = _strict_json(out)
    assert record["generated_features"] == record["reference_features"] == "digits_classifier"
    assert record["reference"] == "test" and record["reference_samples"] == 359
    assert record["reference_stats_source"] == (
        "computed from digits:test (uint8) with digits_classifier"
    )
    assert "uint8" in record["preprocessing"]
    # 50 samples < 128 feature dimensions: flagged in the JSON and in the log.
    (warning,) = record["warnings"]
    assert warning.startswith("fd: 50 generated samples < 128")
    assert warning in caplog.text
    assert cli_main([*args[:3], "200", *args[4:], "--metrics", "fd"]) == 0
    big = Path(capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")[-1])
    assert _strict_json(big)["warnings"] == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--num-samples", "0", "expected an integer >= 1, got 0"),
        ("--steps", "0", "expected an integer >= 1, got 0"),
        ("--batch-size", "-2", "expected an integer >= 1, got -2"),
    ],
)
def test_eval_command_refuses_non_positive_counts(trained, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(trained.run_dir), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_command_refuses_bad_metrics_reference_and_out(trained, tmp_path, capsys):
    def error(*extra):
        code = cli_main(["eval", str(trained.run_dir), "--num-samples", "20", *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tread eval: error: ")
        return lines[0]

    assert "unknown fid; choose from fd,sfid,kid,pr,is,acc" in error("--metrics", "fd,fid")
    assert "unknown (empty)" in error("--metrics", ",")
    notes = tmp_path / "notes.npz"
    notes.write_text("not an archive")
    assert f"{notes}: not an .npz archive" in error("--reference", str(notes))
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros(2))
    assert "neither a stats .npz (keys mu, sigma) nor an ADM batch" in error(
        "--reference", str(other)
    )
    assert "is a directory" in error("--out", str(tmp_path))
    foreign = tmp_path / "foreign.npz"
    save_stats(FeatureStats(mu=np.zeros(4), sigma=np.eye(4), net="other_net"), foreign)
    assert "stats of 'other_net' features cannot score" in error("--reference", str(foreign))


def test_eval_command_refuses_missing_inception_weights(trained, capsys, monkeypatch):
    monkeypatch.delenv("TREAD_INCEPTION_WEIGHTS", raising=False)
    code = cli_main(["eval", str(trained.run_dir), "--feature-net", "inception"])
    assert code == 2
    assert "Inception weights" in capsys.readouterr().err


def _small_eval(config, run_dir):
    """The run's config with a fresh run_dir and 40 eval samples (fast)."""
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, run_dir=str(run_dir), device="cpu"),
        eval=dataclasses.replace(config.eval, num_samples=40),
    )


def _generate_worker(rank, run_dir, port, out, eval_run):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tread.train import evaluation
    from tread.train.dist import DistInfo, init_process_group

    info = DistInfo(rank=rank, world_size=2)
    init_process_group(info, torch.device("cpu"))
    model, config, _ = load_for_inference(run_dir)
    images, labels = generate_images(
        model, config, 7, seed=5, device=torch.device("cpu"), batch_size=3, info=info
    )
    if rank == 1:  # rank 0 alone builds the feature net and reference statistics

        def refuse(*args, **kwargs):
            raise AssertionError("feature net built on rank 1")

        evaluation.feature_net_for = refuse
    small = _small_eval(config, eval_run)
    scores = evaluation.default_eval_hook(small, info)(300, model, small)
    torch.save({"images": images, "labels": labels, "scores": scores}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_generation_and_eval_hook_split_across_ranks_equal_one_process(trained, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, eval_run = tmp_path / "two.pt", tmp_path / "two_ranks"
    mp.spawn(_generate_worker, args=(trained.run_dir, port, out, eval_run), nprocs=2, join=True)
    model, config, _ = load_for_inference(trained.run_dir)
    images, labels = generate_images(model, config, 7, seed=5, device=torch.device("cpu"))
    two = torch.load(f"{out}.0")
    assert torch.equal(two["labels"], labels)
    torch.testing.assert_close(two["images"], images, rtol=1e-5, atol=1e-5)
    # The hook: metrics on rank 0 only, equal to one process's; one reference cache, no temps.
    assert torch.load(f"{out}.1")["scores"] == {}
    single = _small_eval(config, tmp_path / "one_rank")
    alone = default_eval_hook(single)(300, model, single)
    assert set(two["scores"]) == {"fd", "acc"} == set(alone)
    assert two["scores"]["fd"] == pytest.approx(alone["fd"], rel=1e-6)
    assert two["scores"]["acc"] == alone["acc"]
    assert [p.name for p in (eval_run / "eval").iterdir()] == [
        "ref_digits_test_digits_classifier_u8.npz"
    ]


def test_eval_hook_writes_nothing_until_called_and_scores_quantised_samples(trained, tmp_path):
    model, config, _ = load_for_inference(trained.run_dir)
    small = _small_eval(config, tmp_path / "run")
    hook = default_eval_hook(small)
    assert not (tmp_path / "run").exists()  # created: nothing loaded or written yet
    scores = hook(300, model, small)
    assert (tmp_path / "run" / "eval" / "ref_digits_test_digits_classifier_u8.npz").is_file()
    # The hook scores the uint8 images a user would save (both sides quantised).
    images, labels = generate_images(model, small, 40, seed=small.sample.seed, device="cpu")
    net = load_classifier("digits")
    ref = reference_stats("digits", "test", net)
    grid = compute_metrics(quantize_uint8(images), net, ref, labels, ("fd", "acc"), quantize=False)
    raw = compute_metrics(images, net, ref, labels, ("fd",), quantize=False)
    assert scores["fd"] == pytest.approx(grid["fd"], rel=1e-9) and scores["acc"] == grid["acc"]
    assert scores["fd"] != pytest.approx(raw["fd"], rel=1e-9)


def test_eval_hook_runs_on_this_ranks_gpu(trained, monkeypatch):
    from tread.train.dist import DistInfo
    from tread.train.evaluation import eval_device

    _, config, _ = load_for_inference(trained.run_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = dataclasses.replace(config, train=dataclasses.replace(config.train, device="auto"))
    # Not an unindexed "cuda" (GPU 0 for every rank): each rank its own LOCAL_RANK.
    assert eval_device(auto, DistInfo(rank=3, world_size=4, local_rank=1)) == torch.device(
        "cuda", 1
    )
    assert eval_device(auto) == torch.device("cuda", 0)
    cpu = dataclasses.replace(config, train=dataclasses.replace(config.train, device="cpu"))
    assert eval_device(cpu, DistInfo(rank=1, world_size=2, local_rank=1)).type == "cpu"


def test_eval_hook_refuses_bad_settings_at_creation(trained, tmp_path):
    _, config, _ = load_for_inference(trained.run_dir)
    small = _small_eval(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="imgnet"):  # caught by the config or by the hook
        default_eval_hook(
            dataclasses.replace(small, eval=dataclasses.replace(small.eval, feature_net="imgnet"))
        )
    inception = dataclasses.replace(
        small, eval=dataclasses.replace(small.eval, feature_net="inception")
    )
    with pytest.raises(DataError, match="Inception weights not given"):
        default_eval_hook(inception)
    assert not (tmp_path / "run").exists()


def test_eval_guidance_sweep_writes_records_table_and_figure(trained, tmp_path, capsys):
    from tread.cost import forward_flops
    from tread.routing import Route

    model, _, _ = load_for_inference(trained.run_dir)
    dense, routed = forward_flops(model), forward_flops(model, [Route(1, 2, 0.5)])
    out = tmp_path / "sweep.json"
    args = ["eval", str(trained.run_dir), "--num-samples", "40", "--steps", "4", "--seed", "2"]
    args += ["--metrics", "fd,acc", "--guidance", "1,2", "--guidance-mode", "cfg,sg"]
    assert cli_main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert sum("NFE/image" in line and "GFLOPs/image" in line for line in printed) == 4
    assert printed[-1].startswith("sweep of 4 points -> ")
    records = {
        (mode, weight): _strict_json(tmp_path / f"sweep_{mode}_g{weight}.json")
        for mode in ("cfg", "sg")
        for weight in (1, 2)
    }
    evaluations = 2 * 4 - 1  # edm_heun with 4 steps
    cfg1, cfg2, sg1, sg2 = (records[k] for k in [("cfg", 1), ("cfg", 2), ("sg", 1), ("sg", 2)])
    assert cfg1["guidance_mode"] == "cfg" and "sg_weak_ratio" not in cfg1
    assert (sg2["sg_strong_ratio"], sg2["sg_weak_ratio"], sg2["sg_route"]) == (0.0, 0.5, [[1, 2]])
    assert cfg1["nfe_per_image"] == evaluations and cfg2["nfe_per_image"] == 2 * evaluations
    assert cfg2["flops_per_image"] == 2 * evaluations * dense
    assert sg2["flops_per_image"] == evaluations * (dense + routed) < cfg2["flops_per_image"]
    # omega = 1 with a dense strong branch draws the very samples of unguided CFG.
    assert sg1["metrics"]["fd"] == cfg1["metrics"]["fd"] != cfg2["metrics"]["fd"]
    assert sg1["flops_per_image"] == cfg1["flops_per_image"] == evaluations * dense
    table = _strict_json(out)
    assert [(p["guidance_mode"], p["guidance"]) for p in table["points"]] == list(records)
    assert set(table["best_guidance_by_fd"]) == {"cfg", "sg"}
    markdown = out.with_suffix(".md").read_text().splitlines()
    assert markdown[0].startswith("| mode | ω | FD |") and len(markdown) == 2 + 4
    assert sum("**" in line for line in markdown) == 2  # the best FD of each mode
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance", "1,2", "--metrics", "acc"], "a guidance sweep plots fd"),
        (["--guidance-mode", "sg,cfg+sg", "--sg-strong", "0.6"], "below the weak ratio 0.5"),
        (["--guidance-mode", "cfg,sgg"], "'sgg' is not one of cfg, sg, cfg+sg"),
        (["--guidance", "1,-2"], "sample.guidance=-2.0 must be >= 0"),
    ],
)
def test_eval_refuses_bad_guidance_before_sampling(trained, tmp_path, capsys, flags, message):
    out = tmp_path / "x.json"
    assert cli_main(["eval", str(trained.run_dir), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())
