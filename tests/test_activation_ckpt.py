"""Activation checkpointing (``train.activation_checkpointing``): routing-aware, same gradients,
really recomputes, and a training run with it is the run without it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.utils.checkpoint
from safetensors.torch import load_file

import tread
from tread import Route
from tread.config import load_config
from tread.models.registry import arch_fields
from tread.routing import RoutePlan
from tread.train import checkpoint as ckpt
from tread.train import train
from tread.train.builders import build_from_config

from conftest import TINY_RUN

FAMILIES = ("DiT", "LightningDiT", "Mamba", "RWKV")
ROUTE = Route(1, 2, 0.5)  # blocks 1..2 of 4 on half the 16 tokens


def tiny_model(family: str, **options) -> tread.models.RoutableBackbone:
    """A 4-block, width-32 model of ``family`` on 8x8x1 inputs (16 tokens), weights perturbed
    away from the zero-initialised identity so every path carries gradient."""
    name = min(n for n, c in tread.MODEL_CONFIGS.items() if type(c).family == family)
    fields = arch_fields(tread.MODEL_CONFIGS[name])
    sizes = dict(input_size=8, in_channels=1, num_classes=10, depth=4, width=32, patch_size=2)
    if "heads" in fields:
        sizes["heads"] = 2
    model = tread.build_model(name, generator=torch.Generator().manual_seed(0), **sizes, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return model.train()


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.tensor([0, 4, 10][:batch])  # 10 = null label
    weight = torch.randn(batch, 1, 8, 8, generator=g)  # a loss that is not symmetric in outputs
    return x, t, y, weight


def gradients(model, mode: str, *, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Parameter gradients of one forward + backward in ``mode`` (dense, plan, generator)."""
    x, t, y, weight = inputs()
    options: dict = {"routes": []}
    if mode == "plan":
        keep = torch.stack(
            [torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8] for i in range(3)]
        )  # (B, K)
        options = {"routes": [ROUTE], "plans": [RoutePlan(keep.sort(dim=1).values)]}
    elif mode == "generator":
        options = {"routes": [ROUTE], "generator": torch.Generator().manual_seed(3)}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y, **options)
    (out.float() * weight).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def checkpointed_twin(model):
    twin = copy.deepcopy(model)
    twin.activation_checkpointing = True
    return twin


@pytest.mark.parametrize("mode", ["dense", "plan", "generator"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_equal_with_and_without_checkpointing(family, mode):
    model = tiny_model(family)
    plain, checkpointed = gradients(model, mode), gradients(checkpointed_twin(model), mode)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert grad is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)
    if mode != "dense":  # the routes really applied: routed gradients are other gradients
        dense = gradients(model, "dense")
        assert any(not torch.allclose(dense[k], plain[k]) for k in plain)


def test_fp32_after_reinsert_under_autocast_keeps_its_gradients():
    model = tiny_model("DiT", fp32_after_reinsert=True)
    plain = gradients(model, "plan", autocast=True)
    checkpointed = gradients(checkpointed_twin(model), "plan", autocast=True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def count_block_calls(model) -> list[int]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    for block in model.blocks:
        block.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("family", ["DiT", "Mamba"])
def test_checkpointing_recomputes_every_block_in_the_backward_pass(family):
    depth = 4
    for flag, expected in ((False, depth), (True, 2 * depth)):
        model = tiny_model(family)
        model.activation_checkpointing = flag
        calls = count_block_calls(model)
        gradients(model, "generator")
        assert calls[0] == expected, flag
        # Without grad (sampling, evaluation) nothing is checkpointed: one call per block.
        calls[0] = 0
        with torch.no_grad():
            model(*inputs()[:3], routes=[ROUTE], generator=torch.Generator().manual_seed(3))
        assert calls[0] == depth


def test_the_recompute_sees_the_kept_tokens_of_the_forward():
    """Each block's recompute gets exactly the tokens (and RoPE aux) its forward call got."""
    model = checkpointed_twin(tiny_model("LightningDiT"))
    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, i=index: seen.setdefault(i, []).append(
                (args[0].detach().clone(), *(v.clone() for v in kwargs.values()))
            ),
            with_kwargs=True,
        )
    gradients(model, "generator")
    for index, (forward, recompute) in seen.items():
        assert forward[0].shape[1] == (8 if 1 <= index <= 2 else 16)
        assert len(forward) == len(recompute) == 2  # tokens and the rope angles
        for a, b in zip(forward, recompute, strict=True):
            assert torch.equal(a, b), index


def tiny_config(run_dir, *extra):
    return load_config("digits_tread", [*TINY_RUN, f"train.run_dir={run_dir}", *extra])


def test_a_training_run_with_checkpointing_is_the_run_without(tmp_path, monkeypatch):
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    extra = ("train.steps=3", "train.ckpt_every=3", "optim.lr=1e-3")
    runs, counts = {}, {}
    for flag in (False, True):
        calls[0] = 0
        config = tiny_config(tmp_path / str(flag), *extra, f"train.activation_checkpointing={flag}")
        runs[flag] = train(config, progress=False).run_dir
        counts[flag] = calls[0]
    assert counts == {False: 0, True: 3 * 3}  # 3 steps x 3 blocks, one call each
    weights = {
        flag: load_file(str(ckpt.resolve_checkpoint(d) / "model.safetensors"))
        for flag, d in runs.items()
    }
    assert weights[True].keys() == weights[False].keys()  # checkpoints stay interchangeable
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=0, atol=0, msg=key)
    losses = {
        flag: [json.loads(line).get("loss") for line in (d / "metrics.jsonl").open()]
        for flag, d in runs.items()
    }
    assert losses[True] == losses[False] and any(v is not None for v in losses[False])


def test_build_from_config_sets_the_flag_without_touching_the_state_dict(tmp_path):
    from tread.train import prepare_run

    models = {}
    for flag in (False, True):
        config, _ = prepare_run(
            tiny_config(tmp_path / "run", f"train.activation_checkpointing={flag}")
        )
        models[flag] = build_from_config(config)
        assert models[flag].activation_checkpointing is flag
    assert models[True].state_dict().keys() == models[False].state_dict().keys()


def load_benchmark(monkeypatch):
    """benchmarks/activation_memory.py as a module (registered: its dataclasses need it)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "activation_memory.py"
    spec = importlib.util.spec_from_file_location("activation_memory", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "activation_memory", module)
    spec.loader.exec_module(module)
    return module


def test_the_memory_benchmark_measures_every_arm_and_records_an_oom(tmp_path, monkeypatch, capsys):
    bench = load_benchmark(monkeypatch)
    args = ["--input-size", "16", "--batch", "2", "--repeats", "2", "--route-end", "8"]
    bench.main([*args, "--json", str(tmp_path / "a.json")])
    report = json.loads((tmp_path / "a.json").read_text())
    arms = {arm["name"]: arm for arm in report["arms"]}
    assert list(arms) == ["dense", "routed", "routed+ckpt", "dense+ckpt"]
    for arm in arms.values():
        assert arm["error"] is None and len(set(arm["peak_mib_runs"])) == 1  # deterministic
        assert arm["saved_mib"] <= arm["peak_mib"]
    assert arms["dense"]["ratio_to_dense"] == 1.0
    # Routing keeps fewer activations, checkpointing far fewer; the cross-check agrees.
    assert 0.5 < arms["routed"]["ratio_to_dense"] < 0.9
    assert (
        arms["routed+ckpt"]["peak_mib"]
        < arms["dense+ckpt"]["peak_mib"]
        < arms["routed"]["peak_mib"]
    )
    assert abs(arms["routed"]["saved_ratio_to_dense"] - arms["routed"]["ratio_to_dense"]) < 0.05
    assert report["compass_target_met"] == arms["routed"]["meets_target"]
    assert arms["routed"]["weight_copies_mib"] == 0.0  # fp32: no autocast copies
    assert "| routed |" in capsys.readouterr().out

    # bf16: autocast's weight copies are measured apart, the same in every arm.
    bench.main([*args, "--repeats", "1", "--precision", "bf16", "--json", str(tmp_path / "c.json")])
    bf16 = {arm["name"]: arm for arm in json.loads((tmp_path / "c.json").read_text())["arms"]}
    params = sum(p.numel() for p in tread.build_model("DiT-S/2").parameters())
    assert 0.9 < bf16["dense"]["weight_copies_mib"] * 2**20 / (2 * params) <= 1.0
    assert len({arm["weight_copies_mib"] for arm in bf16.values()}) == 1
    assert 0.5 < bf16["routed"]["activation_ratio_to_dense"] < 0.9

    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "cpu_peak_bytes", out_of_memory)
    bench.main([*args, "--repeats", "1", "--json", str(tmp_path / "b.json")])
    failed = json.loads((tmp_path / "b.json").read_text())  # strict JSON: no NaN
    assert all(arm["error"].startswith("out of memory") for arm in failed["arms"])
    assert failed["compass_target_met"] is None
    assert "error: out of memory" in capsys.readouterr().out
