"""scripts/gpu_protocol.sh on a CPU: its dry run (the plan, budgets, commands that parse), its
one-line refusals, ``tread bench``'s one-line CUDA out-of-memory error, and
scripts/random_latents.py."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tread.cli import main as cli_main
from tread.cli import parse_args
from tread.config import load_config
from tread.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_protocol.sh"
STEPS = ("env", "bench", "diffusers", "actmem", "smoke", "compare", "mamba")
PLAN_LINE = re.compile(r"^\[(\d)/7 (\w+) (\d+)s\] (.*)$")
TREAD = "python3 -m tread.cli "


def protocol(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def gpu_files() -> dict[str, float]:
    """What the protocol would write into docs/data: *gpu* files, with their mtimes."""
    data = ROOT / "docs" / "data"
    return {p.name: p.stat().st_mtime for p in data.glob("*gpu*")} if data.is_dir() else {}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run from a directory outside the repository: (result, tmp, the plan's lines)."""
    tmp = tmp_path_factory.mktemp("protocol")
    before = gpu_files()
    result = protocol("--dry-run", "--out", "out", "--work", str(tmp / "work"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp) == [], "a dry run writes nothing"  # not even --out or --work
    assert gpu_files() == before
    plan = [m.groups() for m in map(PLAN_LINE.match, result.stdout.splitlines()) if m]
    return result, tmp, plan


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_dry_run_lists_every_step_within_25_minutes(dry_run):
    result, tmp, plan = dry_run
    out = result.stdout
    assert "ok: tread" in out
    assert "no GPU: dry-run only" in out or re.search(r"ok: \d+ GPU\(s\)", out)
    budgets = {}
    for number, name, budget, _ in plan:
        assert STEPS[int(number) - 1] == name
        budgets.setdefault(name, int(budget))
        assert budgets[name] == int(budget), f"{name}: one budget per step"
    assert tuple(budgets) == STEPS  # every step, in order
    assert 0 < sum(budgets.values()) <= 25 * 60
    assert budgets["compare"] >= 180  # the rest of the time goes to the comparison
    assert f"total: {sum(budgets.values())}s planned of 1500s" in out
    assert str(tmp / "out") in out  # --out is taken from the caller's directory


def test_every_planned_command_is_valid(dry_run, tmp_path):
    """The commands of the plan parse with tread's CLI, and the configs they name load."""
    _, tmp, plan = dry_run
    commands = [shlex.split(command) for _, _, _, command in plan]
    tread_args = []
    for words in commands:
        if words[:3] == ["python3", "-m", "tread.cli"]:
            tread_args.append(words[3:])
        elif words[0] == "torchrun":
            tread_args.append(words[words.index("tread.cli") + 1 :])
    assert {args[0] for args in tread_args} == {"bench", "train", "compare"}
    for args in tread_args:
        parse_args(args)  # argparse exits on an unknown flag or a bad value
    bench_models = [a[a.index("--models") + 1] for a in tread_args if "--models" in a]
    assert sorted(set(bench_models)) == ["DiT-B/2", "DiT-XL/2"]
    assert all("bf16" in a for a in tread_args if "--models" in a)
    assert sum("--compile" in a for a in tread_args if "--models" in a) == 2

    trains = [a for a in tread_args if a[0] == "train"]
    assert len(trains) == 2 and all(a[1] == "imagenet256_dit_xl2_tread" for a in trains)
    # The smoke runs' data: what scripts/random_latents.py would write there (fewer rows).
    latents = Path(next(w for w in trains[0] if w.startswith("data.path=")).split("=", 1)[1])
    write = runpy.run_path(str(ROOT / "scripts" / "random_latents.py"))["write_random_latents"]
    write(latents, 256)
    for args in trains:  # the full config check, batch split included; nothing is written
        assert cli_main([*args, "--dry-run"]) == 0
    assert not any(Path(w.split("=", 1)[1]).exists() for w in trains[0] if "run_dir" in w)

    compare = next(a for a in tread_args if a[0] == "compare")
    overrides = [w for w in compare[2:] if "=" in w and not w.startswith("--")]
    config = load_config(compare[1], overrides)
    tokens = (config.data.pad_to // config.model.with_architecture().patch_size) ** 2
    assert config.data.name == "fashion_mnist" and tokens == 256

    actmem = next(words for words in commands if "activation_memory.py" in " ".join(words))
    assert actmem[1:] == [
        "benchmarks/activation_memory.py",
        "--model",
        "DiT-XL/2",
        "--batch",
        "32",
        "--device",
        "cuda",
        "--json",
        str(tmp / "out" / "activation_memory_gpu.json"),
    ]
    script = ROOT / actmem[1]
    if script.is_file():  # its flags exist
        usage = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert all(flag in usage for flag in ("--model", "--batch", "--device", "--json"))


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    for args, words in (
        (["--bogus"], "unknown option '--bogus'"),
        (["--minutes", "30"], "--minutes 30"),
        (["--steps", "1,9"], "unknown step '9'"),
        (["--out"], "--out needs a value"),
    ):
        result = protocol(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
        assert result.stderr.startswith("gpu_protocol.sh: error: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_a_real_run_without_a_gpu_refuses_in_one_line(tmp_path):
    result = protocol("--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gpu_protocol.sh: error: no GPU: nvidia-smi is missing or finds no GPU; on this "
        "machine only --dry-run runs"
    ]
    assert os.listdir(tmp_path) == []


def test_a_step_subset_and_a_shorter_budget(tmp_path):
    result = protocol("--dry-run", "--steps", "2,compare", "--minutes", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [m.group(2) for m in map(PLAN_LINE.match, result.stdout.splitlines()) if m]
    assert list(dict.fromkeys(names)) == ["env", "bench", "compare"]  # env: always
    assert "planned of 720s" in result.stdout
    assert "compare fashion_tread --minutes 0.8 " in result.stdout  # (250 s - 150 s) / 2 arms
    short = protocol("--dry-run", "--steps", "1,2,6", "--minutes", "10", cwd=tmp_path)
    assert "[6/7 compare 130s] would fail: only 130s left: too little for two arms" in short.stdout
    too_many = protocol("--dry-run", "--steps", "2,5", "--minutes", "5", cwd=tmp_path)
    assert too_many.returncode == 2 and "select fewer" in too_many.stderr


def test_bench_reports_cuda_out_of_memory_in_one_line(monkeypatch, capsys):
    """The protocol's batch search retries a smaller batch when a try ran out of memory."""

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr("tread.bench.benchmark_step", out_of_memory)
    args = ["bench", "--models", "DiT-S/2", "--batch", "256", "--device", "cpu", "--compile"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        "tread bench: error: --batch 256: out of memory on cpu for DiT-S/2 (fp32, compiled); "
        "try a smaller --batch\n"
    )


def test_random_latents_are_seeded_and_load_as_a_latent_dataset(tmp_path):
    script = ROOT / "scripts" / "random_latents.py"
    run = [sys.executable, str(script), "--count", "1100", "--classes", "7"]  # > 1 chunk
    for name in ("a", "b"):
        subprocess.run([*run, str(tmp_path / name)], check=True, capture_output=True)
    # Two shards (1024 + 76 rows), the layout encode-latents writes.
    shards = [np.load(tmp_path / "a" / f"latents_{k:05d}.npy") for k in (0, 1)]
    assert [s.shape[0] for s in shards] == [1024, 76] and shards[0].dtype == np.float16
    a = np.concatenate(shards)  # (1100, 4, 32, 32)
    b = np.concatenate([np.load(tmp_path / "b" / f"latents_{k:05d}.npy") for k in (0, 1)])
    assert a.shape == (1100, 4, 32, 32)
    assert np.array_equal(a, b)  # same seed, same bytes
    assert 5.0 < float(a.astype(np.float32).std()) < 6.0  # unscaled SD-VAE spread, 1/0.18215
    labels = np.concatenate([np.load(tmp_path / "a" / f"labels_{k:05d}.npy") for k in (0, 1)])
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(7))
    data = load_dataset("latents", path=str(tmp_path / "a"), scale_factor=0.18215)
    assert len(data) == 1100
    images, got = data.take(torch.tensor([1099, 3]))  # streamed rows, in the order asked
    assert torch.equal(images, torch.from_numpy(a[[1099, 3]]).float() * 0.18215)
    assert torch.equal(got, torch.from_numpy(labels[[1099, 3]]))
    bad = subprocess.run([*run[:2], "--count", "0", str(tmp_path / "c")], capture_output=True)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1


# Stand-ins for a GPU machine: nvidia-smi, and tread commands that answer at once (bench runs
# out of memory above batch 64 for DiT-XL/2, 32 for diffusers dit-xl; the activation benchmark
# crashes).
FAKE_NVIDIA_SMI = """#!/bin/bash
case "$*" in
  -L) echo "GPU 0: Fake H100 (UUID: GPU-0)" ;;
  *memory.used*) echo 1234; echo 4321; sleep 600 ;;
  *name,memory.total*) echo "Fake H100, 81559 MiB, 550.00" ;;
  *) echo "Fake H100" ;;
esac
"""
FAKE_PYTHON = """#!/bin/bash
if [[ "$1 $2" == "-m tread.cli" ]]; then shift 2; exec {python} {fake} "$@"; fi
if [[ "$1" == benchmarks/activation_memory.py ]]; then echo boom >&2; exit 1; fi
exec {python} "$@"
"""
FAKE_TORCHRUN = """#!/bin/bash
while [[ "$1" != -m ]]; do shift; done
shift 2
exec "$PYTHON" -m tread.cli "$@"
"""
FAKE_TREAD = """
import json, pathlib, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
if args[0] == "bench":
    batch = int(value("--batch"))
    name = value("--models") if "--models" in args else value("--diffusers")
    if "xl" in name.lower() and batch > (64 if "--models" in args else 32):
        sys.exit("tread bench: error: --batch %d: out of memory on cuda:0" % batch)
    row = {"model": name, "batch": batch, "compiled": "--compile" in args}
    pathlib.Path(value("--json")).write_text(json.dumps([row]))
elif args[0] == "train":
    run_dir = pathlib.Path(next(a for a in args if a.startswith("train.run_dir=")).split("=")[1])
    (run_dir / "checkpoints").mkdir(parents=True)
    rows = [{"step": 5 * i, "loss": 1.0 / i, "it_s": 1.0 + i, "img_s": 256.0 * (1 + i)}
            for i in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
elif args[0] == "compare":
    out = pathlib.Path(value("--out"))
    out.mkdir(parents=True)
    (out / "compare.json").write_text(json.dumps({"minutes": float(value("--minutes"))}))
    (out / "report.md").write_text("# report")
"""


def test_a_run_records_every_step_and_goes_on_after_a_failure(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "nvidia-smi": FAKE_NVIDIA_SMI,
        "python3": FAKE_PYTHON.format(python=sys.executable, fake=tmp_path / "fake_tread.py"),
        "torchrun": FAKE_TORCHRUN,
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake_tread.py").write_text(FAKE_TREAD)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python3"),
    }
    out, work = tmp_path / "out", tmp_path / "work"
    args = ("--out", str(out), "--work", str(work), "--fashion", str(fashion))
    result = protocol(*args, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # one step failed
    manifest = json.loads((out / "gpu_manifest.json").read_text())
    assert manifest["device_name"] == "Fake H100" and manifest["torch"] == torch.__version__
    assert manifest["budget_s"] == 1500
    status = {step["step"]: step["status"] for step in manifest["steps"]}
    assert status == {
        "env": "ok",
        "bench": "ok",
        "diffusers": "ok",
        "actmem": "failed",
        "smoke": "ok",
        "compare": "ok",
        "mamba": "skipped",
    }
    steps = {step["step"]: step for step in manifest["steps"]}
    assert steps["actmem"]["log_tail"] == ["boom"]
    notes = steps["bench"]["notes"]
    assert "DiT-XL/2 eager: batch 256 does not fit" in notes
    assert "DiT-XL/2 eager: batch 64" in notes and "DiT-XL/2 compile: batch 64" in notes
    assert not (work / "logs" / "bench_dit_xl2_compile_b256.log").exists()  # from the eager
    bench = json.loads((out / "bench_gpu.json").read_text())
    assert [(r["model"], r["batch"], r["compiled"]) for r in bench] == [
        ("DiT-B/2", 256, False),
        ("DiT-B/2", 256, True),
        ("DiT-XL/2", 64, False),
        ("DiT-XL/2", 64, True),
    ]
    diffusers = json.loads((out / "bench_diffusers_gpu.json").read_text())
    assert [r["batch"] for r in diffusers] == [64, 32, 64]  # dit-xl: 32 after running out
    smoke = json.loads((out / "smoke_imagenet256_dit_xl2_tread_gpu.json").read_text())
    assert set(smoke) == {"single", "torchrun"}
    assert smoke["single"]["it_s_median"] == 3.5  # the first row (start-up) left out
    assert smoke["single"]["peak_memory_used_mib_nvidia_smi"] == 4321
    assert not (work / "smoke_single" / "checkpoints").exists()  # big: removed
    compare = json.loads((out / "compare_fashion_gpu" / "compare.json").read_text())
    assert compare["minutes"] > 2  # what the fast steps left
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_diffusers_gpu.json",
        "bench_gpu.json",
        "compare_fashion_gpu",
        "gpu_manifest.json",
        "smoke_imagenet256_dit_xl2_tread_gpu.json",
    ]

    # A later run of some steps into the same --out keeps the other steps' records.
    again = protocol(*args, "--steps", "actmem", cwd=tmp_path, env=env)
    assert again.returncode == 1
    manifest = json.loads((out / "gpu_manifest.json").read_text())
    merged = {step["step"]: step for step in manifest["steps"]}
    assert list(merged) == list(STEPS)
    assert merged["bench"] == steps["bench"]  # from the first run
    assert merged["env"]["end"] >= steps["env"]["end"] and merged["actmem"]["status"] == "failed"
