"""The one loop over a block stack: every backbone runs its blocks through :func:`route_blocks`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .plan import RoutePlan, sample_plan
from .spec import Route, resolve_routes


def route_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    cond: Any,
    routes: Sequence[Route] = (),
    *,
    aux: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    keep_order: bool = False,
    fp32_after_reinsert: bool = False,
    plans: Sequence[RoutePlan] | None = None,
    checkpoint: bool = False,
) -> Tensor:
    """Run ``blocks`` over the tokens, letting a random share skip each route's span.

    Each block is called as ``block(x, cond, **aux)``. At a route's start the full sequence is
    saved and K tokens per sample are gathered (with the token-aligned ``aux`` tensors); the
    blocks of the span run on the K tokens; after the route's end they are scattered back into
    the saved sequence, so skipped tokens re-enter exactly as they left. A route whose kept
    count equals N (ratio 0, or too few tokens to skip any) is the plain loop. With
    ``routes=()`` this is exactly ``for block in blocks: x = block(x, cond, **aux)``.

    Args:
        blocks: the block stack, length = depth.
        x: (B, N, D) tokens.
        cond: per-sample conditioning passed unchanged to every block (not token-aligned).
        routes: sorted, non-overlapping routes (negative indices allowed).
        aux: token-aligned side tensors, each (B, N, ...): positions, RoPE angles, key masks.
        generator: randomness for the token subsets (one draw per route per call).
        keep_order: keep the kept tokens in their original order (needed by scan backbones).
        fp32_after_reinsert: run the block right after each route end with autocast disabled
            and in float32, as the official code does for numerical safety after re-insertion.
        plans: precomputed plans, one per route, used instead of drawing (e.g. rows of a plan
            drawn for the global batch, so data-parallel ranks route exactly as one process).
        checkpoint: activation checkpointing per block: when grad is enabled, each block call
            runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which keeps
            only the block's inputs and recomputes its activations in the backward pass. It is
            routing-aware by construction: the plan is drawn and the tokens and ``aux`` are
            gathered (and scattered back) here, outside the checkpointed call, so the
            checkpointed function draws no random numbers and its recompute sees the very same
            kept tokens. A routed span keeps only its (B, K, D) block inputs. Without grad
            (sampling, evaluation) it is the plain call. It changes memory and time, not values.

    Returns:
        (B, N, D) output tokens.

    Raises:
        ValueError: an invalid route or plan, or an ``aux`` tensor that is not (B, N, ...) like
            ``x`` (checked up front, with or without routes, so the message names it).
    """
    aux = dict(aux or {})
    _check_token_aligned(x, aux)
    batch, num_tokens = x.shape[:2]
    resolved = resolve_routes(routes, len(blocks))
    if plans is not None and len(plans) != len(resolved):
        raise ValueError(f"got {len(plans)} plans for {len(resolved)} routes")
    starts = {r.start: (i, r) for i, r in enumerate(resolved)}
    fp32_blocks: set[int] = set()

    saved: Tensor | None = None  # (B, N, D) sequence at the start of the active route
    plan: RoutePlan | None = None
    end = -1
    block_aux = aux
    for index, block in enumerate(blocks):
        position, route = starts.get(index, (0, None))
        if route is not None and route.num_kept(num_tokens) < num_tokens:
            if plans is not None:
                plan = plans[position]
                if tuple(plan.keep.shape) != (batch, route.num_kept(num_tokens)):
                    raise ValueError(
                        f"plan for {route} has shape {tuple(plan.keep.shape)}, expected "
                        f"{(batch, route.num_kept(num_tokens))}"
                    )
            else:
                plan = sample_plan(
                    batch,
                    num_tokens,
                    route.num_kept(num_tokens),
                    generator=generator,
                    device=x.device,
                    keep_order=keep_order,
                )
            saved, end = x, route.end
            x = plan.gather(x)  # (B, N, D) -> (B, K, D)
            block_aux = {name: plan.gather(value) for name, value in aux.items()}  # (B, K, ...)

        x = _call_block(block, x, cond, block_aux, fp32=index in fp32_blocks, checkpoint=checkpoint)

        if plan is not None and index == end:
            assert saved is not None
            x = plan.scatter(x, saved)  # (B, K, D) -> (B, N, D)
            saved, plan, block_aux = None, None, aux
            if fp32_after_reinsert:
                fp32_blocks.add(index + 1)
    return x


def _check_token_aligned(x: Tensor, aux: Mapping[str, Tensor]) -> None:
    """Refuse tokens that are not (B, N, ...) and ``aux`` tensors whose (B, N) differ from x's.

    Without this a wrong-length ``aux`` (e.g. RoPE angles for another grid) fails deep inside
    torch.gather/scatter with a raw size mismatch, or broadcasts silently in a dense block.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"route_blocks needs tokens x of shape (B, N, D), got {shape}")
    batch, num_tokens = x.shape[:2]
    for name, value in aux.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"aux[{name!r}] must be a tensor (B, N, ...), got {type(value).__name__}"
            )
        if value.dim() < 2:
            raise ValueError(
                f"aux[{name!r}] has shape {tuple(value.shape)}, expected (B, N, ...) = "
                f"({batch}, {num_tokens}, ...)"
            )
        if value.shape[0] != batch:
            raise ValueError(f"aux[{name!r}] has batch size {value.shape[0]}, expected {batch}")
        if value.shape[1] != num_tokens:
            raise ValueError(f"aux[{name!r}] has {value.shape[1]} tokens, expected {num_tokens}")


def _call_block(
    block: nn.Module,
    x: Tensor,
    cond: Any,
    aux: Mapping[str, Tensor],
    *,
    fp32: bool,
    checkpoint: bool,
) -> Tensor:
    """One block call, in float32 if ``fp32``, checkpointed if ``checkpoint`` and grad is on.

    The checkpointed function receives the already-gathered tokens and ``aux``: nothing inside
    it draws from an RNG, so the backward recompute repeats the forward exactly (autocast state
    is restored by ``torch.utils.checkpoint`` itself).
    """
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            _run_block, block, x, cond, aux, fp32=fp32, use_reentrant=False
        )
    return _run_block(block, x, cond, aux, fp32=fp32)


def _run_block(
    block: nn.Module, x: Tensor, cond: Any, aux: Mapping[str, Tensor], *, fp32: bool
) -> Tensor:
    """``block(x, cond, **aux)``, or its float32 variant after a route's end."""
    if fp32:
        return _run_fp32(block, x, cond, aux)
    return block(x, cond, **aux)


def _run_fp32(block: nn.Module, x: Tensor, cond: Any, aux: Mapping[str, Tensor]) -> Tensor:
    """Call ``block`` in float32 with autocast off (the official code's post-route block).

    Outside autocast the block already runs in its parameters' dtype, so it is called as is.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return block(x, cond, **aux)

    def to32(value: Any) -> Any:
        return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value

    with torch.autocast(device_type=x.device.type, enabled=False):
        return block(to32(x), to32(cond), **{k: to32(v) for k, v in aux.items()})
