"""Routing invariants on stand-in blocks: exact round trips, skipped tokens untouched, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tread import Route, route_blocks
from tread.routing import RoutePlan, resolve_routes, sample_plan


class Identity(nn.Module):
    def forward(self, x, cond, **aux):
        return x


class AddIndex(nn.Module):
    """Adds (index + 1) to every token and records the shapes it saw."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.seen: list[tuple[int, ...]] = []
        self.seen_aux: list[torch.Tensor] = []

    def forward(self, x, cond, **aux):
        self.seen.append(tuple(x.shape))
        if "pos" in aux:
            self.seen_aux.append(aux["pos"])
        return x + (self.index + 1)


class Mixer(nn.Module):
    """A block that mixes tokens (like attention), so gradients cross token boundaries."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x, cond, **aux):
        return x + torch.tanh(self.linear(x)) + x.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.99])
def test_identity_blocks_roundtrip(ratio):
    x = torch.randn(4, 37, 8)
    blocks = [Identity() for _ in range(6)]
    g = torch.Generator().manual_seed(0)
    out = route_blocks(blocks, x, None, [Route(1, 4, ratio)], generator=g)
    assert torch.equal(out, x)


@pytest.mark.parametrize("n,ratio", [(256, 0.5), (37, 0.25), (10, 0.99), (1, 0.5), (7, 0.0)])
def test_kept_count(n, ratio):
    route = Route(0, 0, ratio)
    assert route.num_kept(n) == max(1, n - math.floor(n * ratio))
    blocks = [AddIndex(0)]
    route_blocks(blocks, torch.zeros(2, n, 3), None, [route], generator=torch.Generator())
    assert blocks[0].seen == [(2, route.num_kept(n), 3)]


def test_skipped_tokens_leave_span_unchanged_and_kept_are_processed():
    x = torch.randn(5, 64, 4)
    blocks = [AddIndex(i) for i in range(8)]
    out_routed = route_blocks(blocks, x, None, [Route(2, 5, 0.5)], generator=torch.Generator())
    # Blocks 0, 1 add 1+2 before the span; 6, 7 add 7+8 after it; the span adds 3+4+5+6.
    before, span, after = 3.0, 18.0, 15.0
    delta = out_routed - x
    skipped = torch.isclose(delta, torch.full_like(delta, before + after))
    processed = torch.isclose(delta, torch.full_like(delta, before + span + after))
    assert torch.all(skipped | processed)
    per_sample_processed = processed.all(dim=2).sum(dim=1)
    assert torch.all(per_sample_processed == 32)
    # The span saw 32 tokens; the blocks outside it saw all 64.
    assert blocks[2].seen[-1] == (5, 32, 4) and blocks[6].seen[-1] == (5, 64, 4)


def test_skipped_tokens_are_bitwise_the_span_input():
    x = torch.randn(3, 16, 8)
    mixers = nn.ModuleList(Mixer(8) for _ in range(3))
    plan_generator = torch.Generator().manual_seed(7)
    saved = {}

    class Spy(nn.Module):
        def forward(self, x, cond, **aux):
            saved["x"] = x
            return x

    blocks = [mixers[0], Spy(), mixers[1], mixers[2]]
    # Route over blocks 2..3: the skipped rows must equal the output of block 1 exactly.
    out = route_blocks(blocks, x, None, [Route(2, 3, 0.5)], generator=plan_generator)
    keep = sample_plan(3, 16, 8, generator=torch.Generator().manual_seed(7)).keep
    skipped = torch.ones(3, 16, dtype=torch.bool)
    skipped[torch.arange(3).unsqueeze(1), keep] = False
    assert torch.equal(out[skipped], saved["x"][skipped])
    assert not torch.allclose(out[~skipped], saved["x"][~skipped])


def test_aux_tensors_are_gathered_with_the_same_indices():
    B, N = 2, 12
    x = torch.arange(N, dtype=torch.float32).repeat(B, 1).unsqueeze(-1)  # token value = position
    pos = torch.arange(N).repeat(B, 1)  # (B, N)
    seen = []

    class CheckAligned(nn.Module):
        def forward(self, x, cond, pos):
            # The routed tokens still carry their position as value (+1 from block 0).
            assert torch.equal(x[..., 0] - 1, pos.float())
            seen.append(tuple(pos.shape))
            return x

    blocks = [AddIndex(0), CheckAligned(), CheckAligned()]
    out = route_blocks(
        blocks, x, None, [Route(1, 2, 0.5)], aux={"pos": pos}, generator=torch.Generator()
    )
    assert torch.equal(out, x + 1)
    # The check ran on the routed K = 6 tokens (without routing it would pass trivially).
    assert seen == [(B, 6), (B, 6)]
    # After the span, blocks get the full aux again.
    last = AddIndex(3)
    route_blocks(
        [*blocks, last], x, None, [Route(1, 2, 0.5)], aux={"pos": pos}, generator=torch.Generator()
    )
    assert last.seen == [(B, N, 1)] and torch.equal(last.seen_aux[0], pos)


@pytest.mark.parametrize("routes", [[], [Route(1, 2, 0.5)]], ids=["dense", "routed"])
@pytest.mark.parametrize(
    "aux, message",
    [
        ({"rope": torch.zeros(3, 63, 4)}, r"aux\['rope'\] has 63 tokens, expected 64"),
        ({"rope": torch.zeros(1, 64, 4)}, r"aux\['rope'\] has batch size 1, expected 3"),
        ({"mask": torch.zeros(64)}, r"aux\['mask'\] has shape \(64,\), expected \(B, N, ...\)"),
        ({"pos": [1, 2, 3]}, r"aux\['pos'\] must be a tensor"),
    ],
    ids=["tokens", "batch", "rank", "type"],
)
def test_misaligned_aux_is_named_up_front(aux, message, routes):
    blocks = [AddIndex(i) for i in range(4)]
    with pytest.raises(ValueError, match=message) as info:
        route_blocks(blocks, torch.zeros(3, 64, 8), None, routes, aux=aux)
    assert "\n" not in str(info.value)
    assert all(block.seen == [] for block in blocks)  # refused before any block ran


def test_tokens_must_have_batch_and_token_axes():
    with pytest.raises(ValueError, match=r"tokens x of shape \(B, N, D\), got \(8,\)"):
        route_blocks([Identity()], torch.zeros(8), None, [])


def test_keep_order_sorts_indices_and_default_does_not():
    g = torch.Generator().manual_seed(0)
    ordered = sample_plan(8, 64, 32, generator=g, keep_order=True).keep
    assert torch.equal(ordered, ordered.sort(dim=1).values)
    shuffled = sample_plan(8, 64, 32, generator=g).keep
    assert not torch.equal(shuffled, shuffled.sort(dim=1).values)
    # Each row is a set of distinct indices.
    assert all(len(set(row.tolist())) == 32 for row in shuffled)


def test_same_seed_same_subsets_and_fresh_draw_each_call():
    x = torch.randn(4, 32, 8)
    blocks = [Mixer(8) for _ in range(4)]
    route = [Route(1, 2, 0.5)]
    a = route_blocks(blocks, x, None, route, generator=torch.Generator().manual_seed(3))
    b = route_blocks(blocks, x, None, route, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    first = route_blocks(blocks, x, None, route, generator=g)
    second = route_blocks(blocks, x, None, route, generator=g)
    assert not torch.equal(first, second)


def test_routes_empty_and_ratio_zero_are_the_plain_loop():
    x = torch.randn(2, 16, 8)
    blocks = [Mixer(8) for _ in range(4)]
    plain = x
    for block in blocks:
        plain = block(plain, None)
    assert torch.equal(route_blocks(blocks, x, None, []), plain)
    assert torch.equal(route_blocks(blocks, x, None, [Route(0, 3, 0.0)]), plain)


def test_multiple_routes_in_order():
    x = torch.zeros(2, 20, 1)
    blocks = [AddIndex(i) for i in range(8)]
    routes = [Route(0, 1, 0.5), Route(3, -2, 0.75)]
    route_blocks(blocks, x, None, routes, generator=torch.Generator())
    assert [b.seen[-1][1] for b in blocks] == [10, 10, 20, 5, 5, 5, 5, 20]


def test_plan_scatter_gradients_reach_kept_and_skipped():
    saved = torch.randn(2, 6, 3, requires_grad=True)
    plan = RoutePlan(torch.tensor([[0, 2, 4], [5, 1, 3]]))
    kept = plan.gather(saved) * 2
    plan.scatter(kept, saved).sum().backward()
    # Kept positions: gradient 2 through the span; skipped: 1 straight through.
    expected = torch.ones(2, 6, 3)
    expected[0, [0, 2, 4]] = 2
    expected[1, [5, 1, 3]] = 2
    assert torch.equal(saved.grad, expected)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Route(3, 1, 0.5), "start 3 > end 1"),
        (lambda: Route(0, 2, 1.0), "ratio"),
        (lambda: Route(0, 2, -0.1), "ratio"),
        (lambda: Route(0, 2, float("nan")), "ratio"),
        (lambda: Route(0, 2, "0.5"), "ratio"),
        (lambda: Route(0.0, 2, 0.5), "start"),
        (lambda: Route(True, 2, 0.5), "start"),
        (lambda: resolve_routes([Route(0, 12, 0.5)], 12), "end=12 is out of range"),
        (lambda: resolve_routes([Route(-13, 3, 0.5)], 12), "start=-13 is out of range"),
        (lambda: resolve_routes([Route(6, -8, 0.5)], 12), "start 6 > end 4"),
        (lambda: resolve_routes([Route(0, 4, 0.5), Route(4, 6, 0.5)], 12), "non-overlapping"),
        (lambda: resolve_routes([Route(5, 6, 0.5), Route(0, 2, 0.5)], 12), "sorted"),
        (lambda: resolve_routes(Route(0, 2, 0.5), 12), "single Route"),
        (lambda: resolve_routes([(0, 2, 0.5)], 12), "tread.Route"),
    ],
)
def test_invalid_routes_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_invalid_route_refused_at_call_time():
    with pytest.raises(ValueError, match="out of range"):
        route_blocks([Identity()] * 4, torch.zeros(1, 4, 2), None, [Route(2, 4, 0.5)])


def test_negative_indices_resolve_against_depth():
    assert resolve_routes([Route(2, -4, 0.5)], 12) == (Route(2, 8, 0.5),)
    assert resolve_routes([Route(2, -4, 0.5)], 28) == (Route(2, 24, 0.5),)


def test_explicit_plans_replace_the_draw_and_slices_match_the_global_batch():
    """Rows of a plan drawn for a global batch route each shard exactly as one big call does."""
    x = torch.randn(4, 16, 8)
    blocks = [Mixer(8) for _ in range(3)]
    route = [Route(1, 1, 0.5)]
    plan = sample_plan(4, 16, 8, generator=torch.Generator().manual_seed(0))
    full = route_blocks(blocks, x, None, route, plans=[plan])
    drawn = route_blocks(blocks, x, None, route, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, drawn)
    halves = [
        route_blocks(blocks, x[rows], None, route, plans=[RoutePlan(plan.keep[rows])])
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert torch.allclose(torch.cat(halves), full, atol=1e-6)
    with pytest.raises(ValueError, match="plans for"):
        route_blocks(blocks, x, None, route, plans=[plan, plan])


def test_describe_routes_resolves_indices_and_names_dense():
    from tread.routing import describe_routes

    assert describe_routes([Route(2, -4, 0.5)], 8) == "r(2→4, 0.5)"
    assert describe_routes([Route(0, 1, 0.25), Route(-3, -1, 0.75)], 8) == (
        "r(0→1, 0.25), r(5→7, 0.75)"
    )
    assert describe_routes([], 8) == "dense"
    with pytest.raises(ValueError):
        describe_routes([Route(0, 9, 0.5)], 8)


def test_force_keep_tokens_are_always_kept_and_the_rest_is_uniform() -> None:
    force = torch.zeros(3, 10, dtype=torch.bool)
    force[0, [2, 7]] = True
    force[2, :6] = True  # more than K = 4: the whole batch keeps 6
    counts = torch.zeros(10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        plan = sample_plan(3, 10, 4, generator=gen, force_keep=force, keep_order=True)
        keep = plan.keep
        assert keep.shape == (3, 6)
        for row in range(3):
            assert set(force[row].nonzero().flatten().tolist()) <= set(keep[row].tolist())
            assert keep[row].unique().numel() == 6
        counts[keep[1]] += 1
    # Row 1 forces nothing: its 6 of 10 are uniform (each token kept 0.6 of the time).
    assert torch.allclose(counts / 400, torch.full((10,), 0.6), atol=0.1)
    with pytest.raises(ValueError, match=r"force_keep must be a \(B, N\) = \(3, 10\) bool mask"):
        sample_plan(3, 10, 4, force_keep=torch.ones(3, 10))


def test_force_keep_does_not_change_the_random_stream() -> None:
    """Without forced tokens the draw is the plain one: turning the option on is free."""
    none = torch.zeros(2, 16, dtype=torch.bool)
    plain = sample_plan(2, 16, 8, generator=torch.Generator().manual_seed(3))
    forced = sample_plan(2, 16, 8, generator=torch.Generator().manual_seed(3), force_keep=none)
    assert torch.equal(plain.keep, forced.keep)
