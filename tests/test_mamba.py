"""Mamba backbone: registry sizes, forward contract, gradients, cost model, the selective scans,
and the scan-order routing rule (each block scans the tokens it is given, ordered by their grid
positions: the pattern restricted to the kept tokens)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tread
from tread import Route
from tread.config import config_from_dict, config_to_dict, config_to_yaml, load_config
from tread.errors import ConfigError
from tread.models import registry
from tread.models.layers import modulate
from tread.models.mamba import Mamba, MambaConfig, registry_entries
from tread.models.scan import (
    SCANS,
    grid_positions,
    mamba_ssm_scan,
    scan_orders,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
    zigzag_keys,
)
from tread.routing import resolve_routes
from tread.train import load_for_inference, train

# Parameters at 32x32x4 latents, 1000 classes, learn_sigma=True (as DiT's table counts them),
# default bidirectional scan. TREAD Table 2 reports "Mamba 111M"; Mamba-B/2 is our preset near it.
DOCUMENTED_PARAMS = {
    "Mamba-S/2": 29_188_256,
    "Mamba-S/4": 29_243_648,
    "Mamba-B/2": 112_492_832,
    "Mamba-B/4": 112_603_520,
    "Mamba-L/2": 391_700_512,
    "Mamba-L/4": 391_848_064,
}
PAPER_PARAMS = {"Mamba-B/2": 111e6}

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=4, width=32, patch_size=2)
GRID = 4  # TINY: 8 / 2 tokens per side, 16 tokens


def tiny_mamba(**overrides) -> Mamba:
    """A 4-block, width-32 Mamba on 8x8x1 inputs with 10 classes (16 tokens at patch 2)."""
    routes = overrides.pop("routes", ())
    options = {k: overrides.pop(k) for k in ("keep_order", "fp32_after_reinsert") if k in overrides}
    config = MambaConfig(**{**TINY, **overrides})
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
def with_mamba_registry(monkeypatch):
    """The registry with the Mamba entries added (until the lead wires them in)."""
    for name, config in registry_entries().items():
        monkeypatch.setitem(registry.MODEL_CONFIGS, name, config)


# --- 1. registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(registry_entries()))
def test_every_registry_entry_builds_with_its_documented_size(name):
    config = registry_entries()[name]
    assert config.family == "Mamba" and name.startswith("Mamba-") and config.scan == "bidirectional"
    device = "cpu" if name == "Mamba-S/2" else "meta"  # large ones on meta: no memory, no init
    with torch.device(device):
        model = dataclasses.replace(config, learn_sigma=True).build()
    params = sum(p.numel() for p in model.parameters())
    assert params == DOCUMENTED_PARAMS[name]
    if name in PAPER_PARAMS:
        assert params == pytest.approx(PAPER_PARAMS[name], rel=0.015)
    assert model.num_tokens == (32 // config.patch_size) ** 2 and type(model).scan_order


@pytest.mark.parametrize("name", ["Mamba-S/2", "Mamba-B/2"])
def test_zigzag_has_one_scan_direction_per_block(name):
    config = registry_entries()[name]
    counts = {}
    for scan in SCANS:
        with torch.device("meta"):
            model = dataclasses.replace(config, scan=scan).build()
        counts[scan] = sum(p.numel() for p in model.parameters())
        assert {len(block.mixer.ssms) for block in model.blocks} == {2 if scan == SCANS[0] else 1}
    # One direction: conv (E*d_conv + E), x_proj E*(R + 2N), dt_proj (R*E + E), A_log E*N, D E.
    E, R, N = config.inner, config.dt_rank, config.d_state
    direction = E * config.d_conv + E + E * (R + 2 * N) + R * E + E + E * N + E
    assert counts["bidirectional"] - counts["zigzag"] == config.depth * direction


def test_registry_build_and_overrides(with_mamba_registry):
    model = tread.build_model("Mamba-S/2", **TINY, scan="zigzag", d_state=8, expand=3)
    assert isinstance(model, Mamba) and model.keep_order  # scan backbone: order forced on
    ssm = model.blocks[0].mixer.ssms[0]
    assert ssm.A_log.shape == (96, 8) and len(model.blocks[0].mixer.ssms) == 1
    assert model.config.describe() == "depth 4, width 32, zigzag scan, d_state 8"
    with pytest.raises(ValueError, match="unknown option"):
        tread.build_model("Mamba-S/2", heads=4)  # the S6 mixer has no heads
    with pytest.raises(ValueError, match="scan must be one of"):
        MambaConfig(depth=2, width=32, patch_size=2, scan="spiral")
    with pytest.raises(ValueError, match="divisible by 4"):
        MambaConfig(depth=2, width=30, patch_size=2)
    with pytest.raises(ValueError, match="d_state must be >= 1"):
        MambaConfig(depth=2, width=32, patch_size=2, d_state=0)


@pytest.mark.parametrize("preset", ["digits_mamba", "digits_mamba_tread"])
def test_presets_load_with_the_mamba_entries(with_mamba_registry, preset):
    config = load_config(preset)
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config
    arch = config.model.architecture()
    assert config.model.name == "Mamba-S/2"
    assert (arch["depth"], arch["width"], arch["patch_size"]) == (8, 128, 1)
    assert arch["scan"] == "zigzag" and "heads" not in arch
    routes = config.routes()
    if preset == "digits_mamba":
        assert routes == [] and config.train.run_dir.endswith("digits_mamba")
    else:
        assert [r.resolve(8) for r in routes] == [Route(2, 4, 0.5)]
        assert config.train.run_dir.endswith("digits_mamba_tread")


def test_preset_overrides_follow_the_family(with_mamba_registry):
    config = load_config("digits_mamba", ["model.scan=bidirectional", "model.d_state=4"])
    assert config.model.architecture()["scan"] == "bidirectional"
    with pytest.raises(ConfigError, match="has no heads"):
        load_config("digits_mamba", ["model.heads=4"])
    with pytest.raises(ConfigError, match="scan must be one of"):
        load_config("digits_mamba", ["model.scan=spiral"])


def test_routed_preset_trains_and_reloads_through_the_config_path(with_mamba_registry, tmp_path):
    overrides = [
        "model.depth=3",
        "model.width=32",
        "model.scan=zigzag",
        "model.routes=[{start: 1, end: 1, ratio: 0.5}]",
        "train.batch_size=16",
        "train.steps=2",
        "train.ckpt_every=2",
        "train.sample_every=0",
        "train.max_minutes=null",
        "eval.every=0",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    result = train(load_config("digits_mamba_tread", overrides), progress=False)
    model, config, step = load_for_inference(result.checkpoint)
    assert isinstance(model, Mamba) and step == 2 and config.model.name == "Mamba-S/2"
    assert model.config.scan == "zigzag"
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# --- 2. forward contract ---------------------------------------------------------------------


@pytest.mark.parametrize("scan", SCANS)
def test_routes_empty_and_ratio_zero_match_routeless_model_bitwise(inputs, scan):
    x, t, y = inputs
    plain = tiny_mamba(scan=scan).train()
    routed = tiny_mamba(scan=scan, routes=[Route(1, 2, 0.5)]).train()
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
    assert tiny_mamba(learn_sigma=True)(x, t, y).shape == (3, 2, 8, 8)


# --- 3. seeds and gradients ------------------------------------------------------------------


def test_same_generator_seed_same_output(inputs):
    x, t, y = inputs
    model = tiny_mamba(routes=[Route(1, 2, 0.5)]).train()
    a = model(x, t, y, generator=torch.Generator().manual_seed(5))
    b = model(x, t, y, generator=torch.Generator().manual_seed(5))
    c = model(x, t, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_initial_weights_are_a_function_of_the_generator_seed():
    def build(seed):
        return MambaConfig(**TINY).build(generator=torch.Generator().manual_seed(seed)).state_dict()

    torch.manual_seed(123)  # the global RNG must not matter
    a = build(0)
    torch.manual_seed(456)
    b, c = build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("mixer.in_proj.weight", "mixer.ssms.1.conv1d.weight", "mixer.ssms.0.dt_proj.bias"):
        assert not torch.equal(a[f"blocks.0.{name}"], c[f"blocks.0.{name}"]), name
    # Mamba's SSM init: A = -(1..N) per channel (S4D-real), D = 1, dt = softplus(bias) in
    # [1e-3, 1e-1]; adaLN-Zero.
    A = -torch.exp(a["blocks.2.mixer.ssms.0.A_log"])
    assert torch.allclose(A, -torch.arange(1.0, 17.0).expand(64, 16))
    assert torch.equal(a["blocks.2.mixer.ssms.1.D"], torch.ones(64))
    dt = F.softplus(a["blocks.3.mixer.ssms.0.dt_proj.bias"])
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert not a["blocks.0.ada_ln_modulation.1.weight"].any()


def test_gradients_reach_parameters_through_kept_and_skipped_tokens():
    model = tiny_mamba(routes=[Route(0, 3, 0.5)]).train()  # the route covers every block
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
    model = tiny_mamba(fp32_after_reinsert=fp32_after_reinsert).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(x, t, y, routes=[])
        routed = model(x, t, y, routes=[Route(1, 2, 0.5)], generator=torch.Generator())
    assert routed.dtype == dense.dtype
    assert torch.isfinite(routed).all()


# --- 4. cost model ---------------------------------------------------------------------------


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize(
    "routes", [[], [Route(1, 2, 0.5)], [Route(0, 0, 0.3), Route(2, -1, 0.75)]], ids=str
)
def test_cost_model_matches_flop_counter(routes, scan):
    config = MambaConfig(depth=4, width=64, patch_size=2, input_size=16, scan=scan)
    model = config.build().train()
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.rand(2), torch.tensor([3, 1000])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, routes=routes, generator=torch.Generator())
    tokens = [config.num_tokens] * config.depth
    for route in resolve_routes(routes, config.depth):
        for index in range(route.start, route.end + 1):
            tokens[index] = route.num_kept(config.num_tokens)
    # The counter sees every linear and convolution and nothing of the element-wise scan,
    # which block_flops adds on top (derived in MambaConfig.scan_flops).
    scan_part = 2 * sum(config.scan_flops(n) for n in tokens)
    assert tread.forward_flops(model, routes, batch=2) - scan_part == counter.get_total_flops()
    assert scan_part > 0 and tread.ideal_speedup(config, [Route(1, 2, 0.5)]) > 1


class _ElementwiseCounter(TorchDispatchMode):
    """Counts element-wise arithmetic: one FLOP per output element of mul/add/exp, and
    numel(in) - numel(out) adds per sum."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mul", "add", "exp"):
            self.flops += out.numel()
        elif name == "sum":
            self.flops += args[0].numel() - out.numel()
        return out


@pytest.mark.parametrize("scan", SCANS)
def test_scan_flops_count_the_reference_scan_op_by_op(scan):
    config = MambaConfig(depth=1, width=32, patch_size=2, input_size=8, d_state=4, scan=scan)
    E, N, L = config.inner, config.d_state, 7
    tensors = _scan_inputs(3, E, N, L, dtype=torch.float32)
    with _ElementwiseCounter() as counter:
        selective_scan_reference(*tensors)
    assert counter.flops * config.directions == 3 * config.scan_flops(L)


# --- 5. the selective scans ------------------------------------------------------------------


def _scan_inputs(batch, channels, states, length, *, seed=0, dtype=torch.float64, dt_scale=1.0):
    """u, delta, A, B, C, D in mamba_ssm's layout; delta in (0, 2 dt_scale), A in [-16, 0)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=g, dtype=dtype)
    delta = 2 * dt_scale * torch.rand(batch, channels, length, generator=g, dtype=dtype)
    A = -16 * torch.rand(channels, states, generator=g, dtype=dtype) - 1e-3
    B = torch.randn(batch, states, length, generator=g, dtype=dtype)
    C = torch.randn(batch, states, length, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype)
    return u, delta, A, B, C, D


def _value_and_grads(fn, tensors, seed=7):
    leaves = [tensor.clone().requires_grad_() for tensor in tensors]
    out = fn(*leaves)
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype
    )
    (out * grad_out).sum().backward()
    return [out, *[leaf.grad for leaf in leaves]]


def test_reference_scan_is_the_recurrence():
    u, delta, A, B, C, D = _scan_inputs(2, 3, 4, 6)
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    expected = []
    for t in range(6):
        for b in range(2):
            for e in range(3):
                for n in range(4):
                    decay = torch.exp(delta[b, e, t] * A[e, n])
                    h[b, e, n] = decay * h[b, e, n] + delta[b, e, t] * B[b, n, t] * u[b, e, t]
        expected.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    assert torch.allclose(selective_scan_reference(u, delta, A, B, C, D), torch.stack(expected, -1))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 64])
@pytest.mark.parametrize("length", [1, 5, 16, 33])
def test_chunked_scan_equals_reference_forward_and_gradients(length, chunk_size):
    # dt up to 8 with |A| up to 16: a log-space scan would overflow here (exp(128) in a chunk).
    tensors = _scan_inputs(3, 5, 4, length, seed=length, dt_scale=4.0)
    fast = _value_and_grads(lambda *a: selective_scan_chunked(*a, chunk_size=chunk_size), tensors)
    reference = _value_and_grads(selective_scan_reference, tensors)
    for name, a, b in zip(("y", "u", "delta", "A", "B", "C", "D"), fast, reference, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), name


def test_chunked_scan_float32_and_without_skip():
    tensors = _scan_inputs(4, 16, 16, 40, dtype=torch.float32, dt_scale=0.1)
    fast = _value_and_grads(selective_scan_chunked, tensors)
    reference = _value_and_grads(selective_scan_reference, tensors)
    for a, b in zip(fast, reference, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    no_skip = [selective_scan_chunked(*tensors[:5]), selective_scan_reference(*tensors[:5])]
    assert torch.allclose(*no_skip, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scan itself never runs in bf16
        assert torch.equal(selective_scan_chunked(*tensors), fast[0].detach())
        # Backward called inside autocast too.
        in_autocast = _value_and_grads(selective_scan_chunked, tensors)
    for a, b in zip(in_autocast, fast, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [selective_scan_reference, selective_scan_chunked])
def test_scan_is_causal(fn):
    tensors = _scan_inputs(2, 4, 3, 12)
    changed = [tensor.clone() for tensor in tensors]
    for index in (0, 1, 3, 4):  # u, delta, B, C from step 7 on
        changed[index][..., 7:] = torch.rand_like(changed[index][..., 7:])
    before, after = fn(*tensors), fn(*changed)
    assert torch.equal(before[..., :7], after[..., :7])
    assert not torch.allclose(before[..., 7:], after[..., 7:])


def test_scan_direction_is_causal_through_the_conv():
    ssm = tiny_mamba().blocks[0].mixer.ssms[0]  # conv1d + x_proj + dt_proj + scan, E = 64
    x = torch.randn(2, 12, 64)
    changed = x.clone()
    changed[:, 7:] += 1.0
    before, after = ssm(x), ssm(changed)
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_dispatch_uses_the_pure_pytorch_scan_off_cuda(monkeypatch):
    def no_kernel():
        raise AssertionError("the CUDA kernel must not be asked for CPU tensors")

    monkeypatch.setattr("tread.models.scan.mamba_ssm_scan", no_kernel)
    tensors = _scan_inputs(2, 3, 4, 5, dtype=torch.float32)
    assert torch.equal(selective_scan(*tensors), selective_scan_chunked(*tensors))


@pytest.mark.gpu
def test_mamba_ssm_kernel_equals_the_pure_pytorch_scan():
    if not torch.cuda.is_available() or mamba_ssm_scan() is None:
        pytest.skip("needs CUDA and mamba_ssm (pip install tread[ssm])")
    tensors = _scan_inputs(4, 32, 16, 100, dtype=torch.float32, dt_scale=0.1)
    cpu = _value_and_grads(selective_scan_chunked, tensors)
    cuda = _value_and_grads(selective_scan, [tensor.cuda() for tensor in tensors])
    for name, a, b in zip(("y", "u", "delta", "A", "B", "C", "D"), cpu, cuda, strict=True):
        assert torch.allclose(a, b.cpu(), rtol=1e-3, atol=1e-3), name
    # And the whole model, routed, on both devices.
    model = tiny_mamba().train()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])
    routes = [Route(1, 2, 0.5)]
    expected = model(x, t, y, routes=routes, generator=torch.Generator().manual_seed(0))
    model.cuda()
    out = model(
        x.cuda(), t.cuda(), y.cuda(), routes=routes, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(out.cpu(), expected, rtol=1e-3, atol=1e-4)


# --- 6. scan orders and the routing rule -----------------------------------------------------

# The 8 patterns on a 4x4 grid, written out by hand (raster index = 4 * row + col).
ZIGZAG_4X4 = [
    [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],  # rows from the top left
    [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],  # columns from the top left
    [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8, 12, 13, 14, 15],  # rows from the top right
    [3, 7, 11, 15, 14, 10, 6, 2, 1, 5, 9, 13, 12, 8, 4, 0],  # columns from the top right
    [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],  # rows from the bottom left
    [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],  # columns from the bottom left
    [15, 14, 13, 12, 8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3],  # rows from the bottom right
    [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12],  # columns from the bottom right
]
KEPT = [1, 2, 4, 6, 9, 13, 15]  # a kept subset of the 4x4 grid, in raster order
# Pattern p restricted to KEPT, by hand from the rows above.
ZIGZAG_KEPT = {0: [1, 2, 6, 4, 9, 15, 13], 1: [4, 13, 9, 1, 2, 6, 15], 5: [4, 1, 9, 13, 6, 2, 15]}


def _pos(indices, grid=GRID):
    """(row, col) of raster indices, batched: list of K -> (1, K, 2) long."""
    index = torch.tensor(indices)
    return torch.stack([index // grid, index % grid], dim=-1).unsqueeze(0)


def _visited(indices, order):
    """The raster indices in the order a scan visits them."""
    return [indices[k] for k in order[0].tolist()]


@pytest.mark.parametrize("pattern", range(8))
def test_zigzag_patterns_over_the_full_grid(pattern):
    keys = zigzag_keys(grid_positions(GRID).unsqueeze(0), GRID, pattern)  # (1, 16)
    assert keys[0].argsort().tolist() == ZIGZAG_4X4[pattern]
    # Continuous: every step moves to a grid neighbour (also on an odd grid).
    for grid in (4, 5):
        order = zigzag_keys(grid_positions(grid), grid, pattern).argsort()
        rows, cols = order // grid, order % grid
        assert torch.all((rows.diff().abs() + cols.diff().abs()) == 1)


@pytest.mark.parametrize("block_index", range(10))
def test_zigzag_order_over_a_kept_subset_is_the_pattern_restricted_to_it(block_index):
    pattern = block_index % 8  # blocks cycle through the 8 patterns
    (order,) = scan_orders(_pos(KEPT), GRID, "zigzag", block_index)
    visited = _visited(KEPT, order)
    assert visited == [i for i in ZIGZAG_4X4[pattern] if i in KEPT]
    if pattern in ZIGZAG_KEPT:
        assert visited == ZIGZAG_KEPT[pattern]
    # The input order does not matter: the order comes from the positions.
    shuffled = [KEPT[k] for k in (3, 0, 6, 1, 5, 2, 4)]
    (order,) = scan_orders(_pos(shuffled), GRID, "zigzag", block_index)
    assert _visited(shuffled, order) == visited


def test_bidirectional_orders_are_raster_and_reversed():
    forward, backward = scan_orders(_pos(KEPT), GRID, "bidirectional", 3)
    assert _visited(KEPT, forward) == KEPT and _visited(KEPT, backward) == KEPT[::-1]


def _block_inputs(model, indices, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, len(indices), model.config.width, generator=g)
    c = torch.randn(1, model.config.width, generator=g)
    return x, c, _pos(indices)


def test_bidirectional_block_over_a_kept_set_is_forward_plus_backward_over_it():
    model = tiny_mamba()
    block = model.blocks[1]
    mixer = block.mixer
    x, c, pos = _block_inputs(model, KEPT)
    shift, scale, gate = block.ada_ln_modulation(c).chunk(3, dim=1)
    u, z = mixer.in_proj(modulate(block.norm(x), shift, scale)).chunk(2, dim=-1)  # (1, K, E)
    forward = mixer.ssms[0](u)  # raster order over the kept tokens only
    backward = mixer.ssms[1](u.flip(1)).flip(1)  # reversed kept sequence, then back
    expected = x + gate.unsqueeze(1) * mixer.out_proj((forward + backward) * F.silu(z))
    out = block(x, c, pos)
    assert torch.allclose(out, expected, atol=1e-6)
    # Not the full grid with holes: scanning all 16 positions, skipped ones zero, differs.
    holes = torch.zeros(1, GRID * GRID, model.config.width)
    holes[:, KEPT] = x
    full = block(holes, c, grid_positions(GRID).unsqueeze(0))[:, KEPT]
    assert not torch.allclose(full, out, atol=1e-3)
    # The order comes from the positions, not the input order: permuting tokens and positions
    # together permutes the output alike.
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    assert torch.allclose(block(x[:, perm], c, pos[:, perm]), out[:, perm], atol=1e-6)


@pytest.mark.parametrize("block_index", [0, 1, 2, 5])
def test_zigzag_block_scans_the_kept_tokens_in_the_restricted_pattern(block_index):
    model = tiny_mamba(scan="zigzag", depth=6)
    block = model.blocks[block_index]
    x, c, pos = _block_inputs(model, KEPT, seed=block_index)
    seen = []
    handle = block.mixer.ssms[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = block(x, c, pos)
    handle.remove()
    shift, scale, _ = block.ada_ln_modulation(c).chunk(3, dim=1)
    u, _ = block.mixer.in_proj(modulate(block.norm(x), shift, scale)).chunk(2, dim=-1)
    restricted = [i for i in ZIGZAG_4X4[block_index % 8] if i in KEPT]
    expected = u[:, [KEPT.index(i) for i in restricted]]  # (1, K, E) in scan order
    assert torch.allclose(seen[0], expected, atol=1e-6)
    # Results come back in input order: permuting the input permutes the output alike.
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    assert torch.allclose(block(x[:, perm], c, pos[:, perm]), out[:, perm], atol=1e-6)


def _spy_route(model, route, x, t, y, seed=4):
    """Run a routed forward; return the full sequence before the route and, per block of the
    route, the tokens and positions it was called with."""
    seen = {"blocks": {}}
    handles = [
        model.blocks[route.start - 1].register_forward_hook(
            lambda module, args, out: seen.setdefault("full", out)
        )
    ]
    for index in range(route.start, route.end + 1):

        def record(module, args, kwargs, index=index):
            seen["blocks"][index] = (args[0], kwargs["pos"])

        handles.append(model.blocks[index].register_forward_pre_hook(record, with_kwargs=True))
    try:
        model(x, t, y, routes=[route], generator=torch.Generator().manual_seed(seed))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _positions(full, kept):
    """Where each kept token sits in the full sequence: (B, N, D), (B, K, D) -> (B, K)."""
    match = (kept.unsqueeze(2) == full.unsqueeze(1)).all(dim=-1)  # (B, K, N)
    assert torch.all(match.sum(dim=2) == 1)  # every kept token is exactly one input token
    return match.float().argmax(dim=2)


@pytest.mark.parametrize("scan", SCANS)
def test_routed_blocks_see_kept_tokens_in_raster_order_with_their_positions(inputs, scan):
    x, t, y = inputs
    model = tiny_mamba(scan=scan).train()  # keep_order left False: scan_order must force it
    route = Route(1, 2, 0.5)
    seen = _spy_route(model, route, x, t, y)
    tokens, pos = seen["blocks"][route.start]
    index = _positions(seen["full"], tokens)  # (B, K)
    assert index.shape == (3, 8)
    assert torch.all(index[:, 1:] > index[:, :-1])  # raster order
    # The positions are those of the tokens, gathered with them, in every block of the route.
    assert torch.equal(pos, torch.stack([index // GRID, index % GRID], dim=-1))
    assert torch.equal(seen["blocks"][route.end][1], pos)
