"""The CLI plumbing every command shares: threads, devices, argument types, override parsing."""

from __future__ import annotations

import argparse

import pytest
import torch

from tread.cli import common, parse_args
from tread.errors import ConfigError


def test_auto_threads_leaves_busy_cores_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common, "_available_cores", lambda: 8)
    monkeypatch.setattr(common, "busy_cores", lambda: 3)
    assert common.auto_threads() == 5
    monkeypatch.setattr(common, "busy_cores", lambda: 11)
    assert common.auto_threads() == 1  # an overloaded machine still gets one thread


def test_busy_cores_counts_other_runnable_tasks_and_ignores_blips(monkeypatch):
    from pathlib import Path

    reads = iter(["0.5 0.4 0.3 3/200 99", "0.5 0.4 0.3 2/200 99", "0.5 0.4 0.3 4/200 99"])
    monkeypatch.setattr(Path, "read_text", lambda self: next(reads))
    assert common.busy_cores(samples=3, interval=0) == 1  # min runnable 2, minus this process


def test_auto_threads_respects_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(common, "_available_cores", lambda: 8)
    monkeypatch.setattr(common, "busy_cores", lambda: 7)
    assert common.auto_threads() == 3


def test_set_threads_applies_explicit_count():
    before = torch.get_num_threads()
    try:
        assert common.set_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("text", ["0", "-3", "two", "1.5"])
def test_positive_int_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1"):
        common.positive_int(text)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_refused(name):
    with pytest.raises(ConfigError, match=f"--device {name!r}"):
        common.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="no CUDA device"):
        common.resolve_device("cuda")


def test_cuda_device_follows_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    device = common.resolve_device("auto", local_rank=3)
    assert device == torch.device("cuda", 3)
    assert chosen == [torch.device("cuda", 3)]
    with pytest.raises(ConfigError, match="does not exist"):
        common.resolve_device("cuda:7")


def test_cpu_device():
    assert common.resolve_device("cpu", local_rank=5) == torch.device("cpu")


def test_overrides_after_flags_are_kept():
    args = parse_args(["train", "digits_dit", "--dry-run", "train.steps=5", "--no-progress"])
    assert args.config == ["digits_dit", "train.steps=5"]
    assert args.dry_run and args.no_progress


def test_unknown_flag_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["train", "--dry-run", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_overrides_refused_for_commands_without_config(capsys):
    with pytest.raises(SystemExit):
        parse_args(["sample", "runs/x", "train.steps=5"])
    assert "unrecognized arguments: train.steps=5" in capsys.readouterr().err


def test_help_shows_every_default():
    from tread.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:  # noqa: SLF001
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"default: {action.default}" in text, (name, action.option_strings)
