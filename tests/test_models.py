"""DiT backbone: registry, parameter counts, forward contract, gradients, dtype, cost model."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tread
from tread import Route

from conftest import tiny_dit

# DiT paper, Table 4 (learn_sigma=True, 256x256 images = 32x32x4 latents, 1000 classes).
PAPER_PARAMS_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


@pytest.mark.parametrize(
    "name", sorted(n for n in tread.MODEL_CONFIGS if n.startswith(("DiT-", "SiT-")))
)
def test_every_dit_registry_entry_builds_with_paper_size(name):
    size, patch = name.split("-")[1].split("/")
    device = "cpu" if size == "S" else "meta"  # large ones on meta: no memory, no init time
    with torch.device(device):
        model = tread.build_model(name, learn_sigma=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    # Patch size only changes the patch embed / output layer: within 1.5% of the /2 figure.
    assert params == pytest.approx(PAPER_PARAMS_M[size], rel=0.015)
    assert model.config.num_tokens == (32 // int(patch)) ** 2


def test_forward_shapes_and_learn_sigma(tiny_inputs):
    x, t, y = tiny_inputs
    assert tiny_dit()(x, t, y).shape == (3, 1, 8, 8)
    assert tiny_dit(learn_sigma=True)(x, t, y).shape == (3, 2, 8, 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_learn_sigma_puts_the_prediction_in_the_first_channels(channels):
    """DiT's layout (and its published checkpoints'): out[:, :C] is the prediction.

    A learn_sigma model whose final linear keeps only the rows of the first C channels is the
    plain model, so the objectives can use out[:, :C] and ignore the variance channels.
    """
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, channels, 8, 8, generator=g)
    t, y = torch.rand(2, generator=g), torch.tensor([1, 10])
    wide = tiny_dit(learn_sigma=True, in_channels=channels).eval()
    plain = tiny_dit(in_channels=channels).eval()
    state = wide.state_dict()
    p = wide.config.patch_size
    # The final linear's outputs are laid out (p, p, 2C): keep the rows with channel index < C.
    rows = torch.arange(p * p * 2 * channels).view(p * p, 2 * channels)[:, :channels].flatten()
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        state[name] = state[name][rows]  # (p*p*2C, ...) -> (p*p*C, ...)
    plain.load_state_dict(state)
    out = wide(x, t, y)
    assert torch.equal(out[:, :channels], plain(x, t, y))
    assert not torch.allclose(out[:, channels:], out[:, :channels])  # variance is its own map


def test_routes_empty_and_ratio_zero_match_routeless_model_bitwise(tiny_inputs):
    x, t, y = tiny_inputs
    plain = tiny_dit()
    routed = tiny_dit(routes=[Route(1, 2, 0.5)])
    routed.load_state_dict(plain.state_dict())
    plain.train()
    routed.train()
    reference = plain(x, t, y)
    assert torch.equal(routed(x, t, y, routes=[]), reference)
    assert torch.equal(routed(x, t, y, routes=[Route(0, 3, 0.0)]), reference)
    routed.eval()  # eval mode is dense even with configured routes
    assert torch.equal(routed(x, t, y), reference)
    routed.train()
    assert not torch.allclose(routed(x, t, y, generator=torch.Generator()), reference)


def test_explicit_routes_apply_in_eval_mode(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny_dit().eval()
    dense = model(x, t, y)
    sparse = model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())
    assert not torch.allclose(dense, sparse)


def test_same_generator_seed_same_output(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny_dit(routes=[Route(1, 2, 0.5)]).train()
    a = model(x, t, y, generator=torch.Generator().manual_seed(5))
    b = model(x, t, y, generator=torch.Generator().manual_seed(5))
    c = model(x, t, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradients_reach_embeddings_through_kept_and_skipped_tokens():
    model = tiny_dit(depth=4, routes=[Route(0, 3, 0.5)]).train()  # route covers every block
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    t, y = torch.rand(2), torch.tensor([1, 2])
    out = model(x, t, y, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    # Every input patch gets gradient: skipped tokens go straight from the embedding to the head.
    patch_grad = x.grad.abs().view(2, 1, 4, 2, 4, 2).sum(dim=(1, 3, 5))  # (B, 4, 4) per patch
    assert torch.all(patch_grad > 0)
    for name in ("patch_embed.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.table.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def _record_block_precision(model):
    """Per block call: (autocast on?, input dtype, cond dtype), recorded by pre-hooks."""
    seen = {index: [] for index in range(len(model.blocks))}

    def hook(index):
        def record(module, args):
            seen[index].append((torch.is_autocast_enabled("cpu"), args[0].dtype, args[1].dtype))

        return record

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(model.blocks)]
    return seen, handles


def test_fp32_after_reinsert_runs_the_block_after_each_route_end_in_float32(tiny_inputs):
    # The residual stream is float32 here anyway (fp32 positions are added to the bf16 patch
    # embedding), so what tells the fp32 blocks apart is that autocast is off inside them.
    x, t, y = tiny_inputs
    routes = [Route(0, 0, 0.5), Route(2, 2, 0.5)]  # route ends 0 and 2 -> fp32 blocks 1 and 3
    outputs = {}
    for flag in (False, True):
        model = tiny_dit(fp32_after_reinsert=flag).train()
        seen, handles = _record_block_precision(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[flag] = model(x, t, y, routes=routes, generator=torch.Generator())
        for handle in handles:
            handle.remove()
        for index, calls in seen.items():
            ((autocast_on, x_dtype, cond_dtype),) = calls
            if flag and index in (1, 3):
                assert not autocast_on and x_dtype == cond_dtype == torch.float32, index
            else:
                assert autocast_on, (flag, index)
    assert not torch.equal(outputs[True], outputs[False])


def test_fp32_after_reinsert_is_a_no_op_without_autocast(tiny_inputs):
    x, t, y = tiny_inputs
    routes = [Route(0, 1, 0.5)]
    a = tiny_dit(fp32_after_reinsert=True)(x, t, y, routes=routes, generator=torch.Generator())
    b = tiny_dit()(x, t, y, routes=routes, generator=torch.Generator())
    assert torch.equal(a, b)


@pytest.mark.parametrize("fp32_after_reinsert", [False, True])
def test_dtype_preserved_under_bf16_autocast(tiny_inputs, fp32_after_reinsert):
    x, t, y = tiny_inputs
    model = tiny_dit(fp32_after_reinsert=fp32_after_reinsert).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(x, t, y, routes=[])
        routed = model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())
    assert routed.dtype == dense.dtype
    assert torch.isfinite(routed).all()


def _kept_positions(model, x, t, y, route):
    """Which positions of the route-start sequence the first routed block sees, in its order."""
    seen = {}
    before = model.blocks[route.start - 1].register_forward_hook(
        lambda module, args, out: seen.__setitem__("full", out)
    )
    first = model.blocks[route.start].register_forward_pre_hook(
        lambda module, args: seen.__setitem__("kept", args[0])
    )
    out = model(x, t, y, routes=[route], generator=torch.Generator().manual_seed(4))
    before.remove()
    first.remove()
    full, kept = seen["full"], seen["kept"]  # (B, N, D), (B, K, D)
    match = (kept.unsqueeze(2) == full.unsqueeze(1)).all(dim=-1)  # (B, K, N)
    assert torch.all(match.sum(dim=2) == 1)  # every kept token is exactly one input token
    return match.float().argmax(dim=2), out  # (B, K) positions


def test_keep_order_model_option_is_used(tiny_inputs):
    x, t, y = tiny_inputs
    route = Route(1, 2, 0.5)
    ordered, a = _kept_positions(tiny_dit(keep_order=True), x, t, y, route)
    shuffled, b = _kept_positions(tiny_dit(keep_order=False), x, t, y, route)
    assert ordered.shape == (3, 8)
    # keep_order=True: the span sees its tokens in raster order; the default does not.
    assert torch.equal(ordered, ordered.sort(dim=1).values)
    assert not torch.equal(shuffled, shuffled.sort(dim=1).values)
    # Same seed, same subset; attention is permutation-equivariant, so outputs agree.
    assert torch.equal(ordered, shuffled.sort(dim=1).values)
    assert torch.allclose(a, b, atol=1e-5)


def test_backbone_aux_of_the_wrong_length_is_named(tiny_inputs):
    x, t, y = tiny_inputs
    model = tiny_dit()
    embed = model.embed

    def embed_with_rope(x, t, y):
        tokens, cond, _ = embed(x, t, y)
        return tokens, cond, {"rope": tokens.new_zeros(3, model.num_tokens - 1, 4)}

    model.embed = embed_with_rope
    with pytest.raises(ValueError, match=r"aux\['rope'\] has 15 tokens, expected 16"):
        model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(routes=[Route(2, 12, 0.5)]), "out of range"),
        (dict(routes=[Route(0, 5, 0.5), Route(3, 6, 0.5)]), "non-overlapping"),
        (dict(input_size=30), "not divisible by patch_size"),
        (dict(bogus=1), "unknown option"),
    ],
)
def test_invalid_builds_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tread.build_model("DiT-S/4", **overrides)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'"):
        tread.build_model("DiT-M/2")


@pytest.mark.parametrize(
    "routes", [[], [Route(1, 2, 0.5)], [Route(0, 0, 0.3), Route(2, -1, 0.75)]], ids=str
)
def test_cost_model_matches_flop_counter(routes):
    model = tread.build_model("DiT-S/2", input_size=16, depth=4, width=64, heads=4).train()
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.rand(2), torch.tensor([3, 1000])
    # The math backend decomposes attention into bmm, which the counter sees on every device.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, routes=routes, generator=torch.Generator())
    measured = counter.get_total_flops()
    assert tread.forward_flops(model, routes, batch=2) == pytest.approx(measured, rel=0.05)


def test_ideal_speedup_paper_defaults():
    # DiT-B/2, r(2->8), 0.5: token-linear work falls to (5 + 7*0.5)/12 of the blocks' cost.
    config = tread.MODEL_CONFIGS["DiT-B/2"]
    speedup = tread.ideal_speedup(config, [Route(2, 8, 0.5)])
    assert 1.35 < speedup < 1.5
    assert tread.ideal_speedup(config, []) == 1.0


def test_ideal_speedup_accepts_what_a_user_has():
    config = tread.MODEL_CONFIGS["DiT-B/2"]
    expected = tread.ideal_speedup(config, [Route(2, 8, 0.5)])
    assert tread.ideal_speedup("DiT-B/2", [(2, 8, 0.5)]) == expected  # name, plain tuples
    with torch.device("meta"):
        model = tread.build_model("DiT-B/2")
    assert tread.ideal_speedup(model, [Route(2, -4, 0.5)]) == expected
    assert tread.forward_flops(model, [(2, 8, 0.5)]) == tread.forward_flops(config, [Route(2, 8)])


@pytest.mark.parametrize(
    "model, routes, message",
    [
        (torch.nn.ModuleList([torch.nn.Linear(4, 4)]), [Route(0, 0)], "torch.utils.flop_counter"),
        ("DiT-M/2", [Route(0, 0)], "unknown model 'DiT-M/2'"),
        ("DiT-S/2", [(0, 1)], r"\(start, end, ratio\) tuples"),
        ("DiT-S/2", Route(0, 1), "single Route"),
        ("DiT-S/2", [(0, 12, 0.5)], "out of range"),
    ],
)
def test_ideal_speedup_says_what_it_needs(model, routes, message):
    with pytest.raises(ValueError, match=message) as info:
        tread.ideal_speedup(model, routes)
    assert "\n" not in str(info.value)


def test_initial_weights_are_a_function_of_the_generator_seed():
    def build(seed):
        g = torch.Generator().manual_seed(seed)
        return tread.build_model("DiT-S/4", depth=2, width=32, heads=2, generator=g).state_dict()

    torch.manual_seed(123)  # the global RNG must not matter
    a = build(0)
    torch.manual_seed(456)
    b, c = build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
