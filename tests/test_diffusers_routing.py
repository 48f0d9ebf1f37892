"""TREAD routing of diffusers transformers through hooks (tread.integrations.diffusers).

Every supported class is built tiny and random from its constructor (offline, milliseconds). The
models run in train mode (routing is off otherwise); DiT's per-block label embedders drop labels
at random in train mode, so every forward re-seeds the global RNG first.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")

from tread import Route  # noqa: E402
from tread.integrations.diffusers import (  # noqa: E402
    BlockAdapter,
    adapter_for,
    enable_routing,
    model_blocks,
)
from tread.routing import RoutePlan  # noqa: E402

BATCH = 2


@dataclass
class Case:
    """A tiny model of one class, its inputs, and its image-token count."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    num_tokens: int

    def run(self, model: nn.Module, inputs: dict) -> Tensor:
        torch.manual_seed(1234)  # DiT's label dropout in train mode draws from the global RNG
        return model(**inputs).sample


def _dit() -> nn.Module:
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def _dit_inputs() -> dict:
    return {
        "hidden_states": torch.randn(BATCH, 4, 8, 8),
        "timestep": torch.tensor([10, 700]),
        "class_labels": torch.tensor([1, 7]),
    }


def _pixart() -> nn.Module:
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        use_additional_conditions=False,
    )


def _pixart_inputs() -> dict:
    mask = torch.ones(BATCH, 16)
    mask[0, 3] = mask[1, 10] = 0  # a self-attention mask is token-aligned: it must be gathered
    return {
        "hidden_states": torch.randn(BATCH, 4, 8, 8),
        "encoder_hidden_states": torch.randn(BATCH, 5, 12),
        "timestep": torch.tensor([10, 700]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "attention_mask": mask,
    }


def _sd3() -> nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    )


def _sd3_inputs() -> dict:
    return {
        "hidden_states": torch.randn(BATCH, 4, 8, 8),
        "encoder_hidden_states": torch.randn(BATCH, 5, 16),
        "pooled_projections": torch.randn(BATCH, 16),
        "timestep": torch.tensor([10, 700]),
    }


def _flux() -> nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_inputs() -> dict:
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1)  # (16, 3)
    return {
        "hidden_states": torch.randn(BATCH, 16, 8),  # packed latents: 16 image tokens
        "encoder_hidden_states": torch.randn(BATCH, 5, 32),
        "pooled_projections": torch.randn(BATCH, 32),
        "timestep": torch.tensor([0.1, 0.7]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
    }


CASES = [
    Case("DiT", _dit, _dit_inputs, 16),
    Case("PixArt", _pixart, _pixart_inputs, 16),
    Case("SD3", _sd3, _sd3_inputs, 16),
    Case("Flux", _flux, _flux_inputs, 16),
]
ROUTE = [Route(1, 2, 0.5)]  # Flux: the second double block and the first single block


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def _model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = case.build()
    _randomize_zero_inits(model)
    return model.train()


def _randomize_zero_inits(model: nn.Module) -> None:
    """diffusers zero-initialises adaLN-Zero gates and output layers; a block that is the
    identity at init would let a wrong routing pass unnoticed, so give every weight a value."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0.0, 0.2)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _shuffled_all(num_tokens: int) -> RoutePlan:
    gen = torch.Generator().manual_seed(5)
    return RoutePlan(torch.stack([torch.randperm(num_tokens, generator=gen) for _ in range(BATCH)]))


def test_adapters_count_the_blocks_of_every_class(case: Case) -> None:
    model = _model(case)
    depth = len(model_blocks(model, adapter_for(model)))
    assert depth == 4
    handle = enable_routing(model, [Route(1, -2, 0.5)])
    assert (handle.routes[0].start, handle.routes[0].end) == (1, 2)
    handle.remove()


def test_routed_forward_differs_and_runs_kept_tokens_only(case: Case) -> None:
    model = _model(case)
    inputs = case.inputs()
    plain = case.run(model, inputs)
    seen: list[int] = []
    inner = model_blocks(model, adapter_for(model))[2]
    handle = enable_routing(model, ROUTE, generator=torch.Generator().manual_seed(3))
    # Registered after the routing hooks, so it sees what the block really gets.
    spy = inner.register_forward_pre_hook(
        lambda m, a, k: seen.append((k.get("hidden_states", a[0] if a else None)).shape[1]),
        with_kwargs=True,
    )
    routed = case.run(model, inputs)
    spy.remove()
    handle.remove()
    assert seen == [case.num_tokens - case.num_tokens // 2]
    assert routed.shape == plain.shape
    assert not torch.allclose(routed, plain, atol=1e-4)
    assert [tuple(p.keep.shape) for p in handle.last_plans] == [(BATCH, 8)]


def test_ratio_zero_is_the_plain_forward_bit_for_bit(case: Case) -> None:
    model = _model(case)
    inputs = case.inputs()
    plain = case.run(model, inputs)
    with enable_routing(model, [Route(1, 2, 0.0)]) as handle:
        routed = case.run(model, inputs)
    assert torch.equal(routed, plain)
    assert handle.last_plans == []


def test_all_tokens_kept_in_a_shuffled_order_is_the_plain_forward(case: Case) -> None:
    """Proves that side inputs (PixArt's mask, Flux's RoPE rows) travel with their tokens."""
    model = _model(case)
    inputs = case.inputs()
    plain = case.run(model, inputs)
    handle = enable_routing(model, ROUTE)
    plan = _shuffled_all(case.num_tokens)
    if case.name == "Flux":  # angles without a batch axis: one order for the whole batch
        plan = RoutePlan(plan.keep[:1].expand(BATCH, -1))
    handle.set_plans([plan])
    routed = case.run(model, inputs)
    handle.remove()
    assert torch.equal(handle.last_plans[0].keep, plan.keep)
    torch.testing.assert_close(routed, plain, atol=2e-5, rtol=1e-5)


def test_gradient_checkpointing_reuses_the_plan(case: Case) -> None:
    """Checkpointed blocks re-run (hooks included) in backward; a fresh draw there would give
    silently wrong gradients. Same generator seed: routed grads equal with and without."""
    grads, plans = [], []
    inputs = case.inputs()
    for checkpointing in (False, True):
        model = _model(case)
        if checkpointing:
            model.enable_gradient_checkpointing()
        handle = enable_routing(model, ROUTE, generator=torch.Generator().manual_seed(11))
        case.run(model, inputs).square().mean().backward()
        handle.remove()
        grads.append(_grads(model))
        plans.append(handle.last_plans)
    assert len(plans[1]) == 1 and torch.equal(plans[0][0].keep, plans[1][0].keep)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_remove_restores_the_plain_forward(case: Case) -> None:
    model = _model(case)
    inputs = case.inputs()
    plain = case.run(model, inputs)
    handle = enable_routing(model, ROUTE)
    case.run(model, inputs)
    handle.remove()
    assert torch.equal(case.run(model, inputs), plain)
    enable_routing(model, ROUTE).remove()  # and routing can be enabled again


def test_eval_mode_and_no_grad_run_dense(case: Case) -> None:
    model = _model(case)
    inputs = case.inputs()
    handle = enable_routing(model, ROUTE)
    model.eval()
    with torch.no_grad():
        plain_eval = case.run(model, inputs)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(case.run(model, inputs), plain_eval)
    model.train()
    with torch.no_grad():
        plain_train = case.run(model, inputs)
    handle = enable_routing(model, ROUTE)
    with torch.no_grad():  # train mode, but no grad: sampling inside a training loop
        assert torch.equal(case.run(model, inputs), plain_train)
    assert handle.last_plans == []
    handle.remove()


def test_state_dict_and_save_pretrained_are_untouched(case: Case, tmp_path) -> None:
    model = _model(case)
    before = model.state_dict()
    handle = enable_routing(model, ROUTE)
    after = model.state_dict()
    assert list(after) == list(before)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).train()
    handle.remove()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert getattr(loaded, "_tread_routing", None) is None


def test_force_keep_tokens_never_skip(case: Case) -> None:
    model = _model(case)
    inputs = case.inputs()
    force = torch.zeros(BATCH, case.num_tokens, dtype=torch.bool)
    force[0, [0, 5]] = True
    force[1, 9] = True
    handle = enable_routing(model, ROUTE, force_keep=force)
    for seed in range(5):
        handle.generator.manual_seed(seed)
        case.run(model, inputs)
        keep = handle.last_plans[0].keep
        for row in range(BATCH):
            forced = force.any(0) if case.name == "Flux" else force[row]
            assert set(forced.nonzero().flatten().tolist()) <= set(keep[row].tolist())
    handle.force_keep = torch.ones(BATCH, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"force_keep has shape \(2, 3\), expected"):
        case.run(model, inputs)
    handle.remove()


def test_flux_rope_rows_follow_the_kept_tokens() -> None:
    case = CASES[3]
    model = _model(case)
    received = []
    inner = model_blocks(model, adapter_for(model))[2]  # first single-stream block
    handle = enable_routing(model, ROUTE, generator=torch.Generator().manual_seed(2))
    signature = inspect.signature(inner.forward)
    spy = inner.register_forward_pre_hook(
        lambda m, a, k: received.append(signature.bind(*a, **k).arguments["image_rotary_emb"][0]),
        with_kwargs=True,
    )
    case.run(model, case.inputs())
    spy.remove()
    handle.remove()
    keep = handle.last_plans[0].keep
    assert torch.equal(keep[0], keep[1])  # one subset for the batch
    full_cos = model.pos_embed(torch.cat([case.inputs()["txt_ids"], case.inputs()["img_ids"]]))[0]
    expected = torch.cat([full_cos[:5], full_cos[5 + keep[0]]])  # text rows, then kept image rows
    assert torch.equal(received[0], expected)


def test_sd3_controlnet_residuals_are_refused() -> None:
    case = CASES[2]
    model = _model(case)
    inputs = case.inputs()
    inputs["block_controlnet_hidden_states"] = [torch.zeros(BATCH, 16, 16)]
    with enable_routing(model, ROUTE), pytest.raises(ValueError, match="block_controlnet"):
        case.run(model, inputs)


def test_bad_calls_name_the_problem() -> None:
    model = _model(CASES[0])
    with pytest.raises(ValueError, match="no routing adapter for Linear"):
        enable_routing(nn.Linear(2, 2), ROUTE)
    with pytest.raises(ValueError, match="out of range for a model with 4 blocks"):
        enable_routing(model, [Route(1, 9, 0.5)])
    handle = enable_routing(model, ROUTE)
    with pytest.raises(ValueError, match="already enabled"):
        enable_routing(model, ROUTE)
    with pytest.raises(ValueError, match="got 2 plans for 1 routes"):
        handle.set_plans([_shuffled_all(16), _shuffled_all(16)])
    handle.remove()
    with pytest.raises(ValueError, match="has no block list 'blocks'"):
        enable_routing(model, ROUTE, adapter=BlockAdapter(("blocks",)))


def test_a_lora_adapter_trains_through_a_routed_model() -> None:
    peft = pytest.importorskip("peft")
    case = CASES[0]
    model = _model(case)
    for param in model.parameters():
        param.requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"])
    # DiTTransformer2DModel has no add_adapter (no PeftAdapterMixin); this is what it calls.
    model = peft.inject_adapter_in_model(config, model)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    keys = list(model.state_dict())
    handle = enable_routing(model, ROUTE, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(lora.values(), lr=0.5)
    inputs = case.inputs()
    before = {n: p.detach().clone() for n, p in lora.items()}
    losses = []
    for _ in range(3):
        loss = case.run(model, inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    handle.remove()
    assert list(model.state_dict()) == keys
    # The adapters inside the routed span (blocks 1, 2) got gradients through the kept tokens.
    moved = [n for n in lora if not torch.equal(lora[n], before[n])]
    assert any("transformer_blocks.1." in n for n in moved)
    assert any("transformer_blocks.2." in n for n in moved)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_generic_adapter_routes_any_block_list() -> None:
    """The documented generic path (docs/diffusers.md): a model of our own, described by an
    adapter, routes and keeps its mask aligned."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
            return x + self.mix(x, x, x, key_padding_mask=key_padding_mask)[0]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(4))

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            for layer in self.layers:
                x = layer(x, key_padding_mask=mask)
            return x

    torch.manual_seed(0)
    net = Net().train()
    x = torch.randn(BATCH, 10, 8)
    mask = torch.zeros(BATCH, 10, dtype=torch.bool)
    mask[:, 7] = True  # token 7 is padding: no one attends to it
    plain = net(x, mask)
    adapter = BlockAdapter(("layers",), hidden="x", token_args=(("key_padding_mask", 1),))
    handle = enable_routing(net, [Route(1, 2, 0.5)], adapter=adapter)
    handle.set_plans([_shuffled_all(10)])
    torch.testing.assert_close(net(x, mask), plain, atol=1e-5, rtol=1e-5)
    routed = net(x, mask)
    handle.remove()
    assert handle.last_plans[0].keep.shape == (BATCH, 5)
    assert not torch.allclose(routed, plain, atol=1e-4)


def test_a_deep_copy_of_a_routed_model_is_plain(case: Case) -> None:
    """An EMA made after enable_routing must not share (or silently lose) the original's state."""
    model = _model(case)
    inputs = case.inputs()
    plain = case.run(model, inputs)
    handle = enable_routing(model, ROUTE)
    twin = copy.deepcopy(model)
    assert getattr(twin, "_tread_routing", None) is None
    assert torch.equal(case.run(twin, inputs), plain)  # train mode, grad on: still dense
    assert handle.last_plans == []  # the copy's forward did not touch the original's handle
    routed = case.run(model, inputs)
    assert len(handle.last_plans) == 1 and not torch.allclose(routed, plain, atol=1e-4)
    enable_routing(twin, ROUTE).remove()  # the copy can be routed on its own
    handle.remove()
