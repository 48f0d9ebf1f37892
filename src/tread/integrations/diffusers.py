"""TREAD routing for diffusers transformers (and any model that runs a list of blocks).

One call routes a pretrained model, with no copy of its forward::

    from tread import Route
    from tread.integrations.diffusers import enable_routing

    gen = torch.Generator().manual_seed(0)
    handle = enable_routing(transformer, [Route(2, -3, 0.5)], generator=gen)
    loss = objective(transformer, ...)  # train mode + grad: half of the image tokens skip 2..-3
    handle.remove()                     # the plain model again

How: hooks. A forward pre-hook on the model opens a fresh "forward" (routing is on only if the
model is in train mode and grad is enabled; the plans of the last forward are dropped). A pre-hook
on a route's first block draws the route's plan (once per model forward: a block re-run by
gradient checkpointing reuses it), saves the full image-token sequence and hands the block the
kept tokens; pre-hooks on the blocks of the span gather the token-aligned side inputs (a
self-attention mask, Flux's RoPE angles); a forward hook on the route's last block scatters the
processed tokens back over the saved sequence. Arguments are bound by the block's signature, so
it does not matter whether the model passes them by position (diffusers' checkpointed path) or
by keyword. Parameters, ``state_dict`` keys, ``save_pretrained``/``from_pretrained`` and PEFT
adapters are untouched: the hooks hold no weights.

Only image tokens are routed: text tokens (``encoder_hidden_states``) run every block. Block
indices count across a model's block lists in order (Flux: the 19 double-stream blocks, then the
38 single-stream ones), so ``Route(2, -3)`` means the same thing as for tread's own models.

This module never imports diffusers: models are recognised by class name (including base
classes), so the same adapters serve subclasses and any diffusers version with the same loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..routing import Route, RoutePlan, resolve_routes, sample_plan


@dataclass(frozen=True)
class BlockAdapter:
    """How a model's blocks are called: everything the routing hooks need to know.

    Attributes:
        block_lists: names (dotted paths allowed) of the model's ``nn.ModuleList`` of blocks, in
            the order the model runs them; route indices count across them.
        hidden: name of the block argument that carries the image tokens, (B, N, D).
        output_index: where the image tokens are in a tuple returned by a block (diffusers'
            joint blocks return ``(encoder_hidden_states, hidden_states)``: 1); None when the
            block returns the tensor itself.
        token_args: other block arguments aligned with the image tokens, as (name, token axis)
            pairs, e.g. ``(("attention_mask", -1),)`` for a (B, 1, N) self-attention bias. They
            are gathered with the kept tokens inside the span; None values are left alone.
        rotary: name of a ``(cos, sin)`` argument of rotary angles without a batch axis, each
            (P + N, head_dim): P leading rows for the tokens that always pass (text), then one row
            per image token. Inside the span the rows of the kept image tokens are selected. As
            the angles have no batch axis, all samples of a batch share one kept subset.
        rotary_prefix: name of the block argument whose length (dim 1) is P (Flux:
            ``encoder_hidden_states``); None: P = 0.
        refuse: (model forward argument, reason) pairs that routing cannot serve, e.g. ControlNet
            residuals added between blocks to full-length tensors. A routed forward that gets
            one of them (not None) raises ``ValueError`` naming it.
    """

    block_lists: tuple[str, ...]
    hidden: str = "hidden_states"
    output_index: int | None = None
    token_args: tuple[tuple[str, int], ...] = ()
    rotary: str | None = None
    rotary_prefix: str | None = None
    refuse: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.block_lists, str) or not self.block_lists:
            raise ValueError(
                "BlockAdapter.block_lists must be a non-empty tuple of names, got "
                f"{self.block_lists!r}"
            )
        if self.rotary_prefix is not None and self.rotary is None:
            raise ValueError("BlockAdapter.rotary_prefix needs BlockAdapter.rotary")

    @property
    def shared_plan(self) -> bool:
        """Whether one kept subset serves the whole batch (angles without a batch axis)."""
        return self.rotary is not None


_CONTROLNET = "ControlNet residuals are added between blocks to full-length tensors"

#: Adapters of the supported diffusers classes (diffusers 0.42), by class name.
ADAPTERS: dict[str, BlockAdapter] = {
    "DiTTransformer2DModel": BlockAdapter(("transformer_blocks",)),
    # PixArt turns a (B, N) self-attention mask into a (B, 1, N) bias before the blocks.
    "PixArtTransformer2DModel": BlockAdapter(
        ("transformer_blocks",), token_args=(("attention_mask", -1),)
    ),
    "SD3Transformer2DModel": BlockAdapter(
        ("transformer_blocks",),
        output_index=1,
        refuse=(
            ("block_controlnet_hidden_states", _CONTROLNET),
            ("skip_layers", "skipped blocks would not run the routing hooks"),
        ),
    ),
    "FluxTransformer2DModel": BlockAdapter(
        ("transformer_blocks", "single_transformer_blocks"),
        output_index=1,
        rotary="image_rotary_emb",
        rotary_prefix="encoder_hidden_states",
        refuse=(
            ("controlnet_block_samples", _CONTROLNET),
            ("controlnet_single_block_samples", _CONTROLNET),
        ),
    ),
}


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter of a supported model class (or of a subclass of one).

    Raises:
        ValueError: the class is not supported; the message says how to pass an adapter.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise ValueError(
        f"no routing adapter for {type(model).__name__} (supported: {', '.join(ADAPTERS)}); "
        "describe its block loop with adapter=BlockAdapter(block_lists=(...), ...) "
        "(see docs/diffusers.md)"
    )


def model_blocks(model: nn.Module, adapter: BlockAdapter) -> list[nn.Module]:
    """The model's blocks in the order it runs them, across ``adapter.block_lists``."""
    blocks: list[nn.Module] = []
    for name in adapter.block_lists:
        try:
            stack = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no block list {name!r}") from None
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"{type(model).__name__}.{name} is a {type(stack).__name__}, not a list of blocks"
            )
        blocks.extend(stack)
    return blocks


class RoutingHandle:
    """Routing hooks installed on one model; :meth:`remove` takes them off.

    Attributes:
        routes: the routes, resolved against the model's block count.
        depth: number of blocks across the adapter's block lists.
        force_keep: optional (B, N) bool mask of image tokens that never skip, read at each
            routed forward (set it per batch, e.g. from a loss mask); with a shared plan (Flux),
            a token forced in any sample is kept for all.
        generator: source of the kept subsets.
        keep_order: keep the kept tokens in their original order (attention does not care).
        last_plans: plans of the latest routed forward, one per route (empty when it ran dense).
    """

    def __init__(
        self,
        model: nn.Module,
        routes: Sequence[Route],
        adapter: BlockAdapter,
        generator: torch.Generator,
        force_keep: Tensor | None,
        keep_order: bool,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.blocks = model_blocks(model, adapter)
        self.depth = len(self.blocks)
        self.routes = resolve_routes(routes, self.depth)
        self.generator = generator
        self.force_keep = force_keep
        self.keep_order = keep_order
        self.last_plans: list[RoutePlan] = []
        self._pending: list[RoutePlan] | None = None
        self._active = False
        self._plans: dict[int, RoutePlan] = {}
        self._saved: dict[int, Tensor] = {}  # route -> (B, N, D) image tokens at its start
        self._dense: set[int] = set()  # routes that keep every token in this forward
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._model_signature = inspect.signature(model.forward)  # read once, bound per forward
        self._install()

    # -- public -------------------------------------------------------------------------------

    def set_plans(self, plans: Sequence[RoutePlan]) -> None:
        """Use these plans (one per route) for the next routed forward instead of drawing.

        A plan may keep any K in 1..N tokens per sample (K = N in a shuffled order is the
        classic check that positions travel with their tokens). Used e.g. to give each
        data-parallel rank its rows of a plan drawn for the global batch.
        """
        if len(plans) != len(self.routes):
            raise ValueError(f"got {len(plans)} plans for {len(self.routes)} routes")
        self._pending = list(plans)

    def remove(self) -> None:
        """Take every hook off: the model runs its plain forward again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._plans.clear()
        self._saved.clear()
        self._active = False
        if getattr(self.model, "_tread_routing", None) is self:
            del self.model._tread_routing

    def __enter__(self) -> RoutingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        routes = ", ".join(f"r({r.start}→{r.end}, {r.ratio:g})" for r in self.routes)
        state = "removed" if not self._hooks else "on"
        return f"RoutingHandle({type(self.model).__name__}, {self.depth} blocks, {routes}; {state})"

    # -- hooks --------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of the routed model (an EMA copy, say) is a plain model: see _Hook."""
        return None

    def _install(self) -> None:
        opener = _Hook(self._open_forward)
        self._hooks.append(self.model.register_forward_pre_hook(opener, with_kwargs=True))
        for index, route in enumerate(self.routes):
            for block_index in range(route.start, route.end + 1):
                block = self.blocks[block_index]
                signature = inspect.signature(block.forward)
                pre = _Hook(self._make_pre_hook(index, block_index == route.start, signature))
                self._hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            end_hook = _Hook(self._make_end_hook(index))
            self._hooks.append(self.blocks[route.end].register_forward_hook(end_hook))
        self.model._tread_routing = self

    def _open_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model pre-hook: decide whether this forward routes and drop the last one's plans."""
        self._plans.clear()
        self._saved.clear()
        self._dense.clear()
        self._active = model.training and torch.is_grad_enabled() and bool(self.routes)
        if self._active:
            self.last_plans = []
            bound = _bind(self._model_signature, args, kwargs, type(model).__name__)
            for name, reason in self.adapter.refuse:
                if bound.arguments.get(name) is not None:
                    raise ValueError(f"cannot route {type(model).__name__} with {name}: {reason}")

    def _make_pre_hook(self, route: int, is_start: bool, signature: inspect.Signature) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self._active:
                return None
            bound = _bind(signature, args, kwargs, type(block).__name__)
            values = bound.arguments
            if is_start:
                hidden = values.get(self.adapter.hidden)
                if not isinstance(hidden, Tensor) or hidden.dim() != 3:
                    raise ValueError(
                        f"{type(block).__name__} argument {self.adapter.hidden!r} must be image "
                        f"tokens (B, N, D), got {_describe(hidden)}"
                    )
                plan = self._plan(route, hidden)
                if plan is None:  # nothing to skip (ratio 0 or too few tokens): the plain block
                    return None
                self._saved[route] = hidden
                values[self.adapter.hidden] = plan.gather(hidden)  # (B, N, D) -> (B, K, D)
            plan = self._plans.get(route)
            if plan is None:
                if route in self._dense:
                    return None
                raise RuntimeError(
                    f"block inside route {self.routes[route]} ran before the route's first block"
                )
            self._gather_side_inputs(plan, values)
            return bound.args, bound.kwargs

        return hook

    def _make_end_hook(self, route: int) -> Callable:
        def hook(block: nn.Module, args: tuple, output: Any) -> Any:
            if not self._active or route not in self._plans:
                return None
            plan, saved = self._plans[route], self._saved[route]
            index = self.adapter.output_index
            kept = output if index is None else output[index]  # (B, K, D)
            full = plan.scatter(kept, saved)  # (B, K, D) into (B, N, D)
            if index is None:
                return full
            return (*output[:index], full, *output[index + 1 :])

        return hook

    # -- helpers ------------------------------------------------------------------------------

    def _plan(self, route: int, hidden: Tensor) -> RoutePlan | None:
        """The route's plan for this forward: drawn once, reused when a block is recomputed.

        None when every token would be kept (ratio 0, or too few tokens to skip any) and no
        plan was set: the span then runs its plain blocks, as in :func:`tread.route_blocks`.
        """
        batch, num_tokens = hidden.shape[:2]
        if route in self._dense:
            return None
        plan = self._plans.get(route)
        if plan is None:
            if self._pending is None and self.routes[route].num_kept(num_tokens) == num_tokens:
                self._dense.add(route)
                return None
            plan = self._draw(route, batch, num_tokens, hidden.device)
            self._plans[route] = plan
            self.last_plans.append(plan)
        return plan

    def _draw(self, route: int, batch: int, num_tokens: int, device: torch.device) -> RoutePlan:
        if self._pending is not None:
            keep = self._pending[route].keep
            if route == len(self.routes) - 1:
                self._pending = None
            if keep.dim() != 2 or keep.shape[0] != batch or not 1 <= keep.shape[1] <= num_tokens:
                raise ValueError(
                    f"plan for {self.routes[route]} has shape {tuple(keep.shape)}, expected "
                    f"({batch}, K) with 1 <= K <= {num_tokens}"
                )
            return RoutePlan(keep.to(device))
        force = self.force_keep
        if force is not None and tuple(force.shape) != (batch, num_tokens):
            raise ValueError(
                f"force_keep has shape {tuple(force.shape)}, expected (B, N) = "
                f"({batch}, {num_tokens}) image tokens"
            )
        num_kept = self.routes[route].num_kept(num_tokens)
        if not self.adapter.shared_plan:
            return sample_plan(
                batch,
                num_tokens,
                num_kept,
                generator=self.generator,
                device=device,
                keep_order=self.keep_order,
                force_keep=force,
            )
        # Angles without a batch axis: one subset for the batch, forced where any sample forces.
        shared = sample_plan(
            1,
            num_tokens,
            num_kept,
            generator=self.generator,
            device=device,
            keep_order=self.keep_order,
            force_keep=None if force is None else force.any(dim=0, keepdim=True),
        )
        return RoutePlan(shared.keep.expand(batch, -1))  # (1, K) -> (B, K)

    def _gather_side_inputs(self, plan: RoutePlan, values: dict[str, Any]) -> None:
        """Replace the token-aligned side inputs in ``values`` by their kept-token rows."""
        for name, axis in self.adapter.token_args:
            value = values.get(name)
            if isinstance(value, Tensor):
                moved = value.movedim(axis, 1)  # token axis -> 1: (B, N, ...)
                values[name] = plan.gather(moved).movedim(1, axis)  # (B, K, ...) -> original axes
        name = self.adapter.rotary
        if name is None or values.get(name) is None:
            return
        prefix = self.adapter.rotary_prefix
        num_prefix = 0 if prefix is None else values[prefix].shape[1]
        cos, sin = values[name]
        keep = plan.keep[0].to(cos.device)  # shared plan: every row is the same (K,)
        rows = torch.cat([torch.arange(num_prefix, device=cos.device), num_prefix + keep])
        values[name] = (cos[rows], sin[rows])  # (P + N, head_dim) -> (P + K, head_dim)


class _Hook:
    """A routing hook as installed on a module.

    ``copy.deepcopy`` of a module copies its hook dicts. The hooks' state lives in the handle of
    the original model, so a copy would route through the original's plans, or not at all, with
    no error. A deep copy of a routed model (an EMA made after ``enable_routing``, say) is
    therefore a plain model: each hook copies to a no-op and the handle to None.
    """

    def __init__(self, hook: Callable) -> None:
        self.hook = hook

    def __call__(self, *args: Any) -> Any:
        return self.hook(*args)

    def __deepcopy__(self, memo: dict) -> Callable:
        return _no_op


def _no_op(*args: Any) -> None:
    """What a routing hook becomes in a deep copy of the model: nothing."""
    return None


def enable_routing(
    model: nn.Module,
    routes: Sequence[Route],
    *,
    generator: torch.Generator | None = None,
    force_keep: Tensor | None = None,
    keep_order: bool = False,
    adapter: BlockAdapter | None = None,
) -> RoutingHandle:
    """Route a model's image tokens around spans of its blocks during training.

    Args:
        model: a supported diffusers transformer (``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``
            or a subclass), or any module described by ``adapter``.
        routes: sorted, non-overlapping :class:`tread.Route` spans; indices count across the
            adapter's block lists; negative indices count from the last block.
        generator: source of the kept subsets (default: a CPU generator seeded with 0). Seed it
            per run (and per rank) for reproducible training.
        force_keep: optional (B, N) bool mask of image tokens that never skip; can be changed
            per batch through ``handle.force_keep``.
        keep_order: keep the kept tokens in their original order (default: random order, as
            the routed span is attention and does not care).
        adapter: how the blocks are called; default: the adapter of the model's class.

    Returns:
        The :class:`RoutingHandle`; ``handle.remove()`` (or leaving ``with handle:``) restores
        the plain model.

    Raises:
        ValueError: an unsupported model without an adapter, an invalid route, or a model
            that already has routing enabled.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"enable_routing needs an nn.Module, got {type(model).__name__}")
    if getattr(model, "_tread_routing", None) is not None:
        raise ValueError(
            f"routing is already enabled on this {type(model).__name__}: call remove() on its "
            "handle first"
        )
    adapter = adapter if adapter is not None else adapter_for(model)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return RoutingHandle(model, routes, adapter, generator, force_keep, keep_order)


def _bind(
    signature: inspect.Signature, args: tuple, kwargs: dict, owner: str
) -> inspect.BoundArguments:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot bind the arguments of {owner}.forward: {err}") from None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


__all__ = [
    "ADAPTERS",
    "BlockAdapter",
    "RoutingHandle",
    "adapter_for",
    "enable_routing",
    "model_blocks",
]
