"""Every backbone family through one contract: the custom backbone of docs/backbones.md routes,
and each registered family builds, prices, configures and routes the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tread
from tread import Route
from tread.routing import RoutePlan

DOC = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"


def _doc_namespace() -> dict:
    """Run the Python block of docs/backbones.md and return its globals."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_the_documented_custom_backbone_trains_and_routes_its_aux():
    ns = _doc_namespace()
    model, PixelNet = ns["model"], ns["PixelNet"]
    assert ns["loss"].isfinite()
    assert all(p.grad is not None for p in model.blocks[2].parameters())

    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(
            lambda mod, args, kwargs, out, i=index: seen.append((i, args[0], kwargs["pos"])),
            with_kwargs=True,
        )
    g = torch.Generator().manual_seed(1)
    x, t, y = (
        torch.randn(2, 1, 8, 8, generator=g),
        torch.rand(2, generator=g),
        torch.tensor([3, 10]),
    )
    keep = torch.stack([torch.randperm(64, generator=g)[:32] for _ in range(2)])  # (B, K)
    model.train()
    routed = model(x, t, y, plans=[RoutePlan(keep)])
    for index, tokens, pos in seen:
        expected = 32 if 1 <= index <= 4 else 64
        assert tokens.shape[1] == pos.shape[1] == expected, index
        if expected == 32:  # the positions of exactly the kept tokens, in the kept order
            assert torch.equal(pos, model.pos[keep])

    def plain_loop(x, t, y):
        tokens, cond, aux = model.embed(x, t, y)
        for block in model.blocks:
            tokens = block(tokens, cond, **aux)
        return model.head(tokens, cond)

    with torch.no_grad():
        reference = plain_loop(x, t, y)
        assert torch.equal(model(x, t, y, routes=[]), reference)
        assert not torch.allclose(routed, reference)
        model.eval()  # dense despite the configured route
        assert torch.equal(model(x, t, y), plain_loop(x, t, y))
    assert isinstance(PixelNet(), tread.models.RoutableBackbone)


# One preset pair per registered family beyond DiT: the dense model and its TREAD twin.
FAMILIES = {"LightningDiT": "lightningdit", "Mamba": "mamba", "RWKV": "rwkv"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_presets_differ_from_their_dense_twin_only_in_routes(family):
    from tread.config import config_to_dict, load_config

    dense = config_to_dict(load_config(f"digits_{FAMILIES[family]}"))
    routed = config_to_dict(load_config(f"digits_{FAMILIES[family]}_tread"))
    assert dense["model"]["name"].startswith(f"{family}-")
    assert dense["model"]["routes"] == []
    assert routed["model"]["routes"][0]["start"] == 2 and routed["model"]["routes"][0]["end"] == -4
    for data in (dense, routed):
        data["model"]["routes"] = []
        data["train"]["run_dir"] = data["preset"] = None
    assert dense == routed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_builds_from_its_preset_and_routes_in_train_mode_only(family):
    from tread.config import load_config
    from tread.train import prepare_run
    from tread.train.builders import build_from_config

    config, _ = prepare_run(load_config(f"digits_{FAMILIES[family]}_tread"))
    model = build_from_config(config)
    assert type(model.config).family == family
    assert model.num_tokens == 64 and len(model.blocks) == 8
    assert model.keep_order == type(model).scan_order  # forced on for scans, off otherwise
    assert tread.ideal_speedup(model, config.routes()) > 1.2
    assert tread.forward_flops(model, config.routes()) < tread.forward_flops(model)

    g = torch.Generator().manual_seed(0)
    x, t, y = (
        torch.randn(2, 1, 8, 8, generator=g),
        torch.rand(2, generator=g),
        torch.tensor([1, 10]),
    )
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-initialised identity
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.train()
        dense = model(x, t, y, routes=[])
        routed = model(x, t, y, generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(routed, dense)
        model.eval()
        assert torch.equal(model(x, t, y), model(x, t, y, routes=[]))


@pytest.mark.parametrize(
    ("family", "key"), [("Mamba", "heads"), ("DiT", "d_state"), ("LightningDiT", "scan")]
)
def test_a_key_the_family_lacks_is_refused_by_name(family, key):
    from tread.config import load_config
    from tread.errors import ConfigError

    preset = "digits_dit" if family == "DiT" else f"digits_{FAMILIES[family]}"
    value = "zigzag" if key == "scan" else 4
    with pytest.raises(ConfigError, match=rf"model\.{key}=.*has no {key}"):
        load_config(preset, [f"model.{key}={value}"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bench_times_every_family_side_by_side(family):
    from tread.bench import benchmark_step

    name = min(n for n, c in tread.MODEL_CONFIGS.items() if type(c).family == family)
    result = benchmark_step(
        name,
        [Route(1, 1, 0.5)],
        input_size=8,
        in_channels=1,
        num_classes=10,
        batch=2,
        warmup=0,
        repeats=1,
        steps_per_repeat=1,
    )
    assert result.tokens == (8 // tread.MODEL_CONFIGS[name].patch_size) ** 2
    assert result.ideal_speedup > 1 and result.dense.images_per_second > 0
