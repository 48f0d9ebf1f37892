"""LightningDiT backbone: registry sizes, the forward contract under routes, the cost model, and
RoPE angles that travel with their tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tread
from tread import Route
from tread.config import load_config
from tread.config.loading import config_to_dict
from tread.models import registry
from tread.models.lightning import (
    LightningDiT,
    LightningDiTConfig,
    apply_rope,
    grid_coordinates,
    registry_entries,
    rope_angles,
)
from tread.routing import RoutePlan
from tread.train.builders import build_from_config

# Exact counts at 32x32x4 inputs, 1000 classes, learn_sigma False (LightningDiT's), QK-norm on.
PARAMS = {
    "LightningDiT-S/1": 32_866_948,
    "LightningDiT-S/2": 32_876_176,
    "LightningDiT-B/1": 130_318_084,
    "LightningDiT-B/2": 130_336_528,
    "LightningDiT-L/1": 457_836_516,
    "LightningDiT-L/2": 457_861_104,
    "LightningDiT-XL/1": 674_901_316,
    "LightningDiT-XL/2": 674_928_976,
}
# Published sizes in millions: LightningDiT-XL 675M (LightningDiT paper; TREAD Table 2). S, B
# and L have no LightningDiT figure (S is ours, for benchmarks beside DiT-S/2), so DiT's (DiT
# paper Table 4): SwiGLU at 2/3 of the 4x hidden width keeps the MLP's parameter count.
PUBLISHED_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


def tiny(routes=(), **overrides) -> LightningDiT:
    """A 4-block, width-32, 2-head (head width 16) LightningDiT on 8x8x1 inputs, 10 classes,
    patch 2 (16 tokens); the zero-initialised adaLN/output perturbed so every path carries
    signal."""
    options = dict(
        depth=4, width=32, heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=10
    )
    build = {k: overrides.pop(k) for k in ("keep_order", "fp32_after_reinsert") if k in overrides}
    options.update(overrides)
    g = torch.Generator().manual_seed(0)
    model = LightningDiTConfig(**options).build(routes, generator=g, **build)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=g))
    return model


# --- 1. registry -----------------------------------------------------------------------------


def test_registry_names_and_sizes():
    entries = registry_entries()
    assert set(entries) == set(PARAMS)
    for name, config in entries.items():
        size = name.split("-")[1].split("/")[0]
        depth, width, heads = {
            "S": (12, 384, 6),
            "B": (12, 768, 12),
            "L": (24, 1024, 16),
            "XL": (28, 1152, 16),
        }[size]
        assert (config.depth, config.width, config.heads) == (depth, width, heads)
        assert config.family == "LightningDiT" and config.learn_sigma is False
        # LightningDiT's SwiGLU width: int(2/3 * int(mlp_ratio * width)), no rounding.
        assert config.swiglu_hidden == int(2 / 3 * int(config.mlp_ratio * width))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_registry_entry_builds_with_its_documented_size(name):
    with torch.device("meta"):  # no memory, no init time
        model = registry_entries()[name].build()
    params = sum(p.numel() for p in model.parameters())
    assert params == PARAMS[name]
    size, patch = name.split("-")[1].split("/")
    assert params / 1e6 == pytest.approx(PUBLISHED_M[size], rel=0.02)
    assert model.num_tokens == (32 // int(patch)) ** 2
    assert isinstance(model, tread.models.RoutableBackbone)


def test_xl2_within_two_percent_of_the_published_675m():
    with torch.device("meta"):
        xl2 = registry_entries()["LightningDiT-XL/2"].build()
        # The released model: XL/1 on 16x16x32 VA-VAE latents.
        release = LightningDiTConfig(
            depth=28, width=1152, heads=16, patch_size=1, input_size=16, in_channels=32
        ).build()
    for model in (xl2, release):
        params = sum(p.numel() for p in model.parameters())
        assert abs(params - 675e6) / 675e6 < 0.02
    assert sum(p.numel() for p in release.parameters()) == 674_965_856


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(width=40, heads=4), "divisible by 4"),  # head width 10: no 2-D RoPE pairs
        (dict(width=30, heads=2), "width must be divisible by 4"),
        (dict(width=32, heads=3), "not divisible by heads"),
        (dict(input_size=9), "not divisible by patch_size"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(mlp_ratio=0.01), "SwiGLU"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    options = dict(depth=2, width=32, heads=2, patch_size=2, input_size=8)
    options.update(overrides)
    with pytest.raises(ValueError, match=message):
        LightningDiTConfig(**options)


# --- 2. the forward contract -----------------------------------------------------------------


def test_forward_shapes_and_learn_sigma(tiny_inputs):
    x, t, y = tiny_inputs
    assert tiny()(x, t, y).shape == (3, 1, 8, 8)
    assert tiny(learn_sigma=True)(x, t, y).shape == (3, 2, 8, 8)
    assert tiny(patch_size=1, qk_norm=False)(x, t, y).shape == (3, 1, 8, 8)


def test_routes_empty_and_ratio_zero_match_routeless_model_bitwise(tiny_inputs):
    x, t, y = tiny_inputs
    plain = tiny().train()
    routed = tiny(routes=[Route(1, 2, 0.5)]).train()
    routed.load_state_dict(plain.state_dict())
    reference = plain(x, t, y)
    assert torch.equal(routed(x, t, y, routes=[]), reference)
    assert torch.equal(routed(x, t, y, routes=[Route(0, 3, 0.0)]), reference)
    routed.eval()  # eval mode is dense even with configured routes
    assert torch.equal(routed(x, t, y), reference)
    routed.train()
    assert not torch.allclose(routed(x, t, y, generator=torch.Generator()), reference)


# --- 3. seeds and gradients ------------------------------------------------------------------


def test_same_generator_seed_same_output(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny(routes=[Route(1, 2, 0.5)]).train()
    a = model(x, t, y, generator=torch.Generator().manual_seed(5))
    b = model(x, t, y, generator=torch.Generator().manual_seed(5))
    c = model(x, t, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_initial_weights_are_a_function_of_the_generator_seed():
    config = LightningDiTConfig(depth=2, width=32, heads=2, patch_size=4)

    def build(seed):
        return config.build(generator=torch.Generator().manual_seed(seed)).state_dict()

    torch.manual_seed(123)  # the global RNG must not matter
    a = build(0)
    torch.manual_seed(456)
    b, c = build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    assert torch.equal(a["blocks.0.attn.q_norm.weight"], torch.ones(16))  # RMSNorm weights: 1
    assert not a["blocks.0.ada_ln_modulation.1.weight"].any()  # adaLN-Zero


def test_gradients_reach_parameters_through_kept_and_skipped_tokens():
    model = tiny(routes=[Route(0, 3, 0.5)]).train()  # the route covers every block
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    t, y = torch.rand(2), torch.tensor([1, 10])
    model(x, t, y, generator=torch.Generator().manual_seed(0)).sum().backward()
    # Every input patch gets gradient: skipped tokens go straight from the embedding to the head.
    patch_grad = x.grad.abs().view(2, 1, 4, 2, 4, 2).sum(dim=(1, 3, 5))  # (B, 4, 4) per patch
    assert torch.all(patch_grad > 0)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# --- 4. the cost model -----------------------------------------------------------------------


def _counted(fn, *args, **kwargs) -> int:
    # The math backend decomposes attention into bmm, which the counter sees on every device.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "routes", [[], [Route(1, 2, 0.5)], [Route(0, 0, 0.3), Route(2, -1, 0.75)]], ids=str
)
def test_cost_model_equals_the_flop_counter(routes):
    config = LightningDiTConfig(depth=4, width=64, heads=4, patch_size=2, input_size=16)
    model = config.build().train()
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.rand(2), torch.tensor([3, 1000])
    measured = _counted(model, x, t, y, routes=routes, generator=torch.Generator())
    assert tread.forward_flops(model, routes, batch=2) == measured


def test_cost_model_parts_equal_the_flop_counter():
    config = LightningDiTConfig(depth=2, width=64, heads=4, patch_size=2, input_size=16)
    model = config.build()
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([3, 1000, 7])
    assert _counted(model.embed, x, t, y) == 3 * config.embed_flops()
    tokens, cond, aux = model.embed(x, t, y)
    for kept in (config.num_tokens, 17, 1):  # dense and routed token counts
        rope = aux["rope"][:, :kept]
        assert _counted(model.blocks[0], tokens[:, :kept], cond, rope=rope) == (
            3 * config.block_flops(kept)
        )
    assert _counted(model.head, tokens, cond) == 3 * config.head_flops()


# --- 5. RoPE travels with its tokens ---------------------------------------------------------


def test_rope_aux_has_the_documented_shape_and_values(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny(patch_size=1, width=48, heads=2)  # 64 tokens, head width 24
    tokens, cond, aux = model.embed(x, t, y)
    assert set(aux) == {"rope"}
    assert aux["rope"].shape == (3, 64, 12) and aux["rope"].dtype == torch.float32
    # Token n (raster order) sits at row n // 8, column n % 8; first half rows, second columns.
    rope = aux["rope"][0]  # (N, head_dim/2)
    freqs = 10000.0 ** (-torch.arange(6) * 4 / 24)  # (head_dim/4,)
    n = torch.arange(64)
    expected = torch.cat([(n // 8)[:, None] * freqs, (n % 8)[:, None] * freqs], dim=1)
    assert torch.allclose(rope, expected)
    assert torch.equal(aux["rope"][2], rope)  # same grid for every sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.embed(x, t, y)[2]["rope"].dtype == torch.float32


def test_rope_is_relative():
    g = torch.Generator().manual_seed(0)
    head_dim = 16
    q, k = torch.randn(2, 3, 5, head_dim, generator=g), torch.randn(2, 3, 5, head_dim, generator=g)
    # Grid positions (B, 5) of the 5 queries and the 5 keys of each sample.
    rows_q, cols_q, rows_k, cols_k = torch.randint(0, 8, (4, 2, 5), generator=g).unbind(0)

    def scores(dr, dc):
        """q . k per head and query/key pair after rotating both by positions shifted by
        (dr, dc): (B, h, 5, 5)."""
        rq = apply_rope(q, rope_angles(rows_q + dr, cols_q + dc, head_dim))
        rk = apply_rope(k, rope_angles(rows_k + dr, cols_k + dc, head_dim))
        return rq @ rk.transpose(-1, -2)

    base = scores(0, 0)
    for shift in [(3, 0), (0, 5), (-2, 7)]:
        assert torch.allclose(scores(*shift), base, atol=1e-5)
    # ... while the rotation itself does depend on the position, and keeps norms.
    shifted = apply_rope(q, rope_angles(rows_q + 1, cols_q, head_dim))
    assert not torch.allclose(shifted, apply_rope(q, rope_angles(rows_q, cols_q, head_dim)))
    assert torch.allclose(shifted.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.equal(apply_rope(q, torch.zeros(2, 5, head_dim // 2)), q)
    assert not torch.allclose(scores(0, 0), q @ k.transpose(-1, -2))


def _shuffled_forward(model, x, t, y, keep, *, gather_aux: bool = True):
    """Run every token through every block in the order ``keep`` gives, scatter back, head."""
    plan = RoutePlan(keep)
    tokens, cond, aux = model.embed(x, t, y)
    shuffled = plan.gather(tokens)  # (B, N, D) -> (B, N, D) in keep's order
    block_aux = {k: plan.gather(v) for k, v in aux.items()} if gather_aux else aux
    for block in model.blocks:
        shuffled = block(shuffled, cond, **block_aux)
    return model.head(plan.scatter(shuffled, tokens), cond)  # back to raster order


def test_all_tokens_in_shuffled_order_give_the_dense_output(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny().eval()
    g = torch.Generator().manual_seed(2)
    keep = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])  # (B, N)
    assert not torch.equal(keep, keep.sort(dim=1).values)
    with torch.no_grad():
        dense = model(x, t, y)
        assert torch.allclose(_shuffled_forward(model, x, t, y, keep), dense, atol=1e-5)
        # The same run with the angles left in raster order: tokens are rotated by another
        # token's position, and the output moves. This is what gathering the aux prevents.
        stale = _shuffled_forward(model, x, t, y, keep, gather_aux=False)
    assert (stale - dense).abs().max() > 1e-2


def test_routed_forward_equals_a_hand_run_span_with_angles_from_the_kept_positions(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny().train()
    grid, head_dim = model.config.grid, model.config.head_dim
    g = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(3)])  # (B, K)
    batch = torch.arange(3).unsqueeze(1)  # (B, 1)

    def by_hand(keep_angles_of):
        tokens, cond, aux = model.embed(x, t, y)
        tokens = model.blocks[0](tokens, cond, **aux)
        kept = tokens[batch, keep]  # (B, N, D) -> (B, K, D)
        # Angles built from the kept tokens' own grid coordinates, not by gathering the aux.
        at = keep_angles_of
        rope = rope_angles(at // grid, at % grid, head_dim, model.config.rope_theta)  # (B, K, 8)
        for block in model.blocks[1:3]:
            kept = block(kept, cond, rope=rope)
        tokens = tokens.clone()
        tokens[batch, keep] = kept  # (B, K, D) into (B, N, D)
        return model.head(model.blocks[3](tokens, cond, **aux), cond)

    with torch.no_grad():
        routed = model(x, t, y, routes=[Route(1, 2, 0.5)], plans=[RoutePlan(keep)])
        assert torch.allclose(routed, by_hand(keep), atol=1e-6)
        # Misaligned angles (those of the same positions in sorted order) are detected.
        assert (routed - by_hand(keep.sort(dim=1).values)).abs().max() > 1e-2


def test_keep_order_does_not_change_the_routed_output(tiny_inputs):
    """Same seed, same subset: ordered or shuffled, the tokens carry their own angles."""
    x, t, y = tiny_inputs
    out = {}
    for keep_order in (False, True):
        model = tiny(routes=[Route(1, 2, 0.5)], keep_order=keep_order).train()
        out[keep_order] = model(x, t, y, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out[False], out[True], atol=1e-5)


@pytest.mark.parametrize("fp32_after_reinsert", [False, True])
def test_dtype_preserved_under_bf16_autocast(tiny_inputs, fp32_after_reinsert):
    x, t, y = tiny_inputs
    model = tiny(fp32_after_reinsert=fp32_after_reinsert).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(x, t, y, routes=[])
        routed = model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())
    assert routed.dtype == dense.dtype
    assert torch.isfinite(routed).all()


# --- presets ---------------------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch):
    """The LightningDiT entries in the registry (until the lead wires them in)."""
    for name, config in registry_entries().items():
        monkeypatch.setitem(registry.MODEL_CONFIGS, name, config)


def test_presets_parse_and_differ_from_the_dit_ones_only_in_model_and_run_dir(registered):
    dense, routed = load_config("digits_lightningdit"), load_config("digits_lightningdit_tread")
    a, b = config_to_dict(dense), config_to_dict(routed)
    dit = config_to_dict(load_config("digits_dit"))
    assert a["model"]["routes"] == [] and b["model"]["routes"]
    assert routed.routes() == [Route(2, -4, 0.5)]
    for section in a:
        if section == "preset":
            continue
        assert {k for k in a[section] if a[section][k] != b[section][k]} <= (
            {"model": {"routes"}, "train": {"run_dir"}}.get(section, set())
        ), section
        assert {k for k in a[section] if a[section][k] != dit[section][k]} <= (
            {"model": {"name"}, "train": {"run_dir"}}.get(section, set())
        ), section
    assert a["model"]["name"] == "LightningDiT-B/2"
    assert (a["train"]["run_dir"], b["train"]["run_dir"]) == (
        "runs/digits_lightningdit",
        "runs/digits_lightningdit_tread",
    )
    shaped = dataclasses.replace(
        routed.model, input_size=8, in_channels=1, num_classes=10
    )  # what the digits data fills in
    model = build_from_config(dataclasses.replace(routed, model=shaped))
    assert isinstance(model, LightningDiT) and model.num_tokens == 64
    config = model.config
    assert (config.depth, config.width, config.heads, config.patch_size) == (8, 128, 4, 1)
    assert model.routes[0].start == 2 and model.routes[0].end == 4


def test_grid_coordinates_are_raster_order():
    rows, cols = grid_coordinates(3)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cols.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
