"""Every backbone family through one contract: the custom backbone of docs/backbones.md routes,
and each registered family builds, prices, configures and routes the same way."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import tread
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
