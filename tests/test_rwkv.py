"""RWKV backbone: registry sizes, forward contract, gradients, cost model, and the WKV /
token-shift routing rule (distances and neighbours measured in the kept sequence)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

import tread
from tread import Route
from tread.config import config_from_dict, config_to_dict, config_to_yaml, load_config
from tread.models import registry
from tread.models.layers import modulate
from tread.models.rwkv import RWKV, RWKVConfig, registry_entries, token_shift
from tread.models.wkv import bi_wkv, bi_wkv_reference
from tread.train import load_for_inference, train

# Parameters at 32x32x4 latents, patch 2, 1000 classes, learn_sigma=True (as DiT's table counts
# them). TREAD Table 2 reports "RWKV 210M"; RWKV-B/2 is our preset near it.
DOCUMENTED_PARAMS = {"RWKV-S/2": 34_625_312, "RWKV-B/2": 204_675_104, "RWKV-L/2": 482_957_344}
PAPER_PARAMS = {"RWKV-B/2": 210e6}

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=4, width=32, patch_size=2)


def tiny_rwkv(**overrides) -> RWKV:
    """A 4-block, width-32 RWKV on 8x8x1 inputs with 10 classes (16 tokens at patch 2)."""
    routes = overrides.pop("routes", ())
    options = {k: overrides.pop(k) for k in ("keep_order", "fp32_after_reinsert") if k in overrides}
    config = RWKVConfig(**{**TINY, **overrides})
    model = config.build(routes, generator=torch.Generator().manual_seed(0), **options)
    # adaLN and the output layer start at zero; perturb so every path carries signal.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return model


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([0, 4, 10])  # 10 = null label
    return x, t, y


@pytest.fixture
def with_rwkv_registry(monkeypatch):
    """The registry with the RWKV entries added (until the lead wires them in)."""
    for name, config in registry_entries().items():
        monkeypatch.setitem(registry.MODEL_CONFIGS, name, config)


# --- 1. registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(registry_entries()))
def test_every_registry_entry_builds_with_its_documented_size(name):
    config = registry_entries()[name]
    assert config.family == "RWKV" and name.startswith("RWKV-") and config.patch_size == 2
    device = "cpu" if name == "RWKV-S/2" else "meta"  # large ones on meta: no memory, no init
    with torch.device(device):
        model = dataclasses.replace(config, learn_sigma=True).build()
    params = sum(p.numel() for p in model.parameters())
    assert params == DOCUMENTED_PARAMS[name]
    if name in PAPER_PARAMS:
        assert params == pytest.approx(PAPER_PARAMS[name], rel=0.03)
    assert model.num_tokens == 256 and type(model).scan_order


def test_registry_build_and_overrides(with_rwkv_registry):
    model = tread.build_model("RWKV-S/2", **TINY, mlp_ratio=2.0)
    assert isinstance(model, RWKV) and model.keep_order  # scan backbone: order forced on
    assert model.blocks[0].channel_mix.key.out_features == 64
    with pytest.raises(ValueError, match="unknown option"):
        tread.build_model("RWKV-S/2", heads=4)  # per-channel WKV: no heads
    with pytest.raises(ValueError, match="divisible by 4"):
        RWKVConfig(depth=2, width=30, patch_size=2)


@pytest.mark.parametrize("preset", ["digits_rwkv", "digits_rwkv_tread"])
def test_presets_load_with_the_rwkv_entries(with_rwkv_registry, preset):
    config = load_config(preset)
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config
    arch = config.model.architecture()
    assert config.model.name == "RWKV-S/2"
    assert (arch["depth"], arch["width"], arch["patch_size"]) == (8, 128, 1)
    assert "heads" not in arch
    routes = config.routes()
    if preset == "digits_rwkv":
        assert routes == [] and config.train.run_dir.endswith("digits_rwkv")
    else:
        assert [r.resolve(8) for r in routes] == [Route(2, 4, 0.5)]
        assert config.train.run_dir.endswith("digits_rwkv_tread")


def test_routed_preset_trains_and_reloads_through_the_config_path(with_rwkv_registry, tmp_path):
    overrides = [
        "model.depth=3",
        "model.width=32",
        "model.routes=[{start: 1, end: 1, ratio: 0.5}]",
        "train.batch_size=16",
        "train.steps=2",
        "train.ckpt_every=2",
        "train.sample_every=0",
        "train.max_minutes=null",
        "eval.every=0",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    result = train(load_config("digits_rwkv_tread", overrides), progress=False)
    model, config, step = load_for_inference(result.checkpoint)
    assert isinstance(model, RWKV) and step == 2 and config.model.name == "RWKV-S/2"
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# --- 2. forward contract ---------------------------------------------------------------------


def test_routes_empty_and_ratio_zero_match_routeless_model_bitwise(inputs):
    x, t, y = inputs
    plain = tiny_rwkv().train()
    routed = tiny_rwkv(routes=[Route(1, 2, 0.5)]).train()
    routed.load_state_dict(plain.state_dict())
    reference = plain(x, t, y)
    assert reference.shape == (3, 1, 8, 8)
    assert torch.equal(routed(x, t, y, routes=[]), reference)
    assert torch.equal(routed(x, t, y, routes=[Route(0, 3, 0.0)]), reference)
    routed.eval()  # eval mode is dense even with configured routes
    assert torch.equal(routed(x, t, y), reference)
    routed.train()
    assert not torch.allclose(routed(x, t, y, generator=torch.Generator()), reference)


def test_learn_sigma_doubles_the_output_channels(inputs):
    x, t, y = inputs
    assert tiny_rwkv(learn_sigma=True)(x, t, y).shape == (3, 2, 8, 8)


# --- 3. seeds and gradients ------------------------------------------------------------------


def test_same_generator_seed_same_output(inputs):
    x, t, y = inputs
    model = tiny_rwkv(routes=[Route(1, 2, 0.5)]).train()
    a = model(x, t, y, generator=torch.Generator().manual_seed(5))
    b = model(x, t, y, generator=torch.Generator().manual_seed(5))
    c = model(x, t, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_initial_weights_are_a_function_of_the_generator_seed():
    def build(seed):
        return RWKVConfig(**TINY).build(generator=torch.Generator().manual_seed(seed)).state_dict()

    torch.manual_seed(123)  # the global RNG must not matter
    a = build(0)
    torch.manual_seed(456)
    b, c = build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.time_mix.key.weight"], c["blocks.0.time_mix.key.weight"])
    # Every parameter is set by reset_parameters: none keeps its constructor value by accident.
    assert not torch.equal(a["blocks.1.time_mix.decay"], a["blocks.2.time_mix.decay"])


def test_gradients_reach_parameters_through_kept_and_skipped_tokens():
    model = tiny_rwkv(routes=[Route(0, 3, 0.5)]).train()  # the route covers every block
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    t, y = torch.rand(2), torch.tensor([1, 2])
    model(x, t, y, generator=torch.Generator().manual_seed(0)).sum().backward()
    # Every input patch gets gradient: skipped tokens go straight from the embedding to the head.
    patch_grad = x.grad.abs().view(2, 1, 4, 2, 4, 2).sum(dim=(1, 3, 5))  # (B, 4, 4) per patch
    assert torch.all(patch_grad > 0)
    for name in ("patch_embed.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.table.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    for name, parameter in model.blocks.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fp32_after_reinsert", [False, True])
def test_dtype_preserved_under_bf16_autocast(inputs, fp32_after_reinsert):
    x, t, y = inputs
    model = tiny_rwkv(fp32_after_reinsert=fp32_after_reinsert).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(x, t, y, routes=[])
        routed = model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())
    assert routed.dtype == dense.dtype
    assert torch.isfinite(routed).all()


# --- 4. cost model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "routes", [[], [Route(1, 2, 0.5)], [Route(0, 0, 0.3), Route(2, -1, 0.75)]], ids=str
)
def test_cost_model_matches_flop_counter_exactly(routes):
    config = RWKVConfig(depth=4, width=64, patch_size=2, input_size=16, mlp_ratio=3.0)
    model = config.build().train()
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.rand(2), torch.tensor([3, 1000])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, routes=routes, generator=torch.Generator())
    # Linears and the WKV's bmm are all the counter sees, and all block_flops counts.
    assert tread.forward_flops(model, routes, batch=2) == counter.get_total_flops()


def test_wkv_flops_are_the_bmm_of_the_implementation():
    w, u = torch.zeros(8), torch.zeros(8)
    k = v = torch.randn(3, 17, 8)
    with FlopCounterMode(display=False) as counter:
        bi_wkv(w, u, k, v)
    assert counter.get_total_flops() == 3 * 4 * 17 * 17 * 8  # B * 4 T^2 C


# --- 5. the WKV and the routing rule ---------------------------------------------------------


def _wkv_by_hand(w, u, k, v, positions, length):
    """Bi-WKV written out token by token, distances |positions[t] - positions[i]| / length."""
    B, T, C = k.shape
    out = torch.empty(B, T, C, dtype=torch.float64)
    k, v, w, u = k.double(), v.double(), w.double(), u.double()
    for t in range(T):
        numerator = torch.zeros(B, C, dtype=torch.float64)
        denominator = torch.zeros(B, C, dtype=torch.float64)
        for i in range(T):
            if i == t:
                weight = torch.exp(u + k[:, i])
            else:
                distance = abs(positions[t] - positions[i])
                weight = torch.exp(k[:, i] - (distance - 1) * w / length)
            numerator += weight * v[:, i]
            denominator += weight
        out[:, t] = numerator / denominator
    return out


def _random_wkv_inputs(batch, length, channels, seed=0, decay_scale=1.0):
    """w, u (C,) and k, v (B, T, C); w spans Vision-RWKV's init range [-5, 3] x decay_scale."""
    g = torch.Generator().manual_seed(seed)
    w = decay_scale * (8 * torch.rand(channels, generator=g) - 5)
    u = torch.randn(channels, generator=g)
    k = 2 * torch.randn(batch, length, channels, generator=g)
    v = torch.randn(batch, length, channels, generator=g)
    return w, u, k, v


@pytest.mark.parametrize("length", [1, 2, 3, 9])
def test_reference_wkv_is_the_formula(length):
    w, u, k, v = _random_wkv_inputs(2, length, 6)
    expected = _wkv_by_hand(w, u, k, v, list(range(length)), length)
    assert torch.allclose(bi_wkv_reference(w, u, k, v).double(), expected, atol=1e-5)


@pytest.mark.parametrize("decay_scale", [1.0, 10.0, -10.0])
@pytest.mark.parametrize("length", [1, 2, 5, 33])
def test_fast_wkv_equals_reference_forward_and_gradients(length, decay_scale):
    w, u, k, v = _random_wkv_inputs(3, length, 16, seed=length, decay_scale=decay_scale)
    results = []
    for fn in (bi_wkv, bi_wkv_reference):
        leaves = [tensor.clone().requires_grad_() for tensor in (w, u, k, v)]
        out = fn(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * grad_out).sum().backward()
        results.append((out, *[leaf.grad for leaf in leaves]))
    for fast, reference in zip(*results, strict=True):
        assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn", [bi_wkv, bi_wkv_reference])
def test_wkv_runs_in_float32_under_autocast(fn):
    w, u, k, v = _random_wkv_inputs(2, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fn(w, u, k, v)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, fn(w, u, k, v), atol=1e-6)  # bf16 would be ~1e-2 off


@pytest.mark.parametrize("fn", [bi_wkv, bi_wkv_reference])
def test_bidirectional_wkv_is_symmetric(fn):
    w, u, k, v = _random_wkv_inputs(2, 11, 8)
    forward = fn(w, u, k, v)
    reversed_ = fn(w, u, k.flip(1), v.flip(1))  # reverse the sequence
    assert torch.allclose(reversed_, forward.flip(1), atol=1e-6)


def test_token_shift_is_defined_at_the_sequence_ends():
    x = torch.arange(1.0, 1 + 2 * 3 * 4).view(2, 3, 4)  # (B, T, D), no zeros
    out = token_shift(x)
    assert torch.equal(out[:, 1:, :2], x[:, :-1, :2])  # first half: from the previous token
    assert torch.equal(out[:, :-1, 2:], x[:, 1:, 2:])  # second half: from the next token
    assert torch.equal(out[:, 0, :2], torch.zeros(2, 2))  # nothing before the first token
    assert torch.equal(out[:, -1, 2:], torch.zeros(2, 2))  # nothing after the last one
    assert torch.equal(token_shift(x[:, :1]), torch.zeros(2, 1, 4))  # a single token
    # A block runs on any kept count, down to one token.
    block = tiny_rwkv().blocks[1]
    for T in (1, 2):
        assert torch.isfinite(block(torch.randn(2, T, 32), torch.randn(2, 32))).all()


def _spy_route_start(model, route, x, t, y, seed=4):
    """Run a routed forward; return the full sequence before the route, the tokens and the
    time-mix input of the route's first block, and its WKV call (inputs and output)."""
    seen = {}
    block = model.blocks[route.start]
    handles = [
        model.blocks[route.start - 1].register_forward_hook(
            lambda module, args, out: seen.setdefault("full", out)
        ),
        block.register_forward_pre_hook(lambda module, args: seen.setdefault("block_in", args)),
        block.time_mix.register_forward_pre_hook(
            lambda module, args: seen.setdefault("time_mix_in", args[0])
        ),
    ]
    wkv_calls = []

    def spy_wkv(w, u, k, v):
        out = bi_wkv(w, u, k, v)
        wkv_calls.append((w, u, k, v, out))
        return out

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("tread.models.rwkv.bi_wkv", spy_wkv)
            model(x, t, y, routes=[route], generator=torch.Generator().manual_seed(seed))
    finally:
        for handle in handles:
            handle.remove()
    seen["wkv"] = wkv_calls[route.start]  # one WKV call per block, in block order
    return seen


def _positions(full, kept):
    """Where each kept token sits in the full sequence: (B, N, D), (B, K, D) -> (B, K)."""
    match = (kept.unsqueeze(2) == full.unsqueeze(1)).all(dim=-1)  # (B, K, N)
    assert torch.all(match.sum(dim=2) == 1)  # every kept token is exactly one input token
    return match.float().argmax(dim=2)


def test_time_mix_sees_the_kept_tokens_in_raster_order(inputs):
    x, t, y = inputs
    model = tiny_rwkv().train()  # keep_order left False: scan_order must force it
    route = Route(1, 2, 0.5)
    seen = _spy_route_start(model, route, x, t, y)
    kept, cond = seen["block_in"]
    positions = _positions(seen["full"], kept)  # (B, K)
    assert positions.shape == (3, 8)
    assert torch.all(positions[:, 1:] > positions[:, :-1])  # raster order
    # The time mix gets exactly those tokens, normed and modulated, in that order.
    block = model.blocks[route.start]
    shift, scale = block.ada_ln_modulation(cond).chunk(6, dim=1)[:2]  # 2 x (B, D)
    index = positions.unsqueeze(-1).expand(-1, -1, 32)  # (B, K) -> (B, K, D)
    ordered = torch.gather(seen["full"], 1, index)  # (B, N, D) -> (B, K, D), raster order
    expected = modulate(block.norm1(ordered), shift, scale)  # (B, K, D)
    assert torch.allclose(seen["time_mix_in"], expected, atol=1e-6)


def test_routed_wkv_measures_distance_in_the_kept_sequence(inputs):
    x, t, y = inputs
    model = tiny_rwkv().train()
    route = Route(1, 2, 0.5)
    seen = _spy_route_start(model, route, x, t, y)
    w, u, k, v, out = seen["wkv"]
    K, N = k.shape[1], model.num_tokens
    assert K == 8
    by_hand = _wkv_by_hand(w, u, k, v, list(range(K)), K)  # kept index distance, T = K
    assert torch.allclose(out.double(), by_hand, atol=1e-5)
    # Not the grid rule (distance between grid positions, normalised by N).
    positions = _positions(seen["full"], seen["block_in"][0])
    for b in range(k.shape[0]):
        grid = _wkv_by_hand(w, u, k[b : b + 1], v[b : b + 1], positions[b].tolist(), N)
        assert not torch.allclose(out[b : b + 1].double(), grid, atol=1e-3)
