"""Peak activation memory of one training forward + backward: dense vs TREAD, with and without
activation checkpointing.

Usage:
    python benchmarks/activation_memory.py [--model DiT-S/2] [--batch 8] [--device cpu]
        [--route-start 2] [--route-end -4] [--ratio 0.5] [--precision fp32|bf16]
        [--threads N] [--repeats 2] [--json PATH]

Four arms on one model (same weights, same inputs, same seeded kept-token plan): ``dense``,
``routed`` (the paper's route r(2 -> depth-4), ratio 0.5), ``routed+ckpt`` and ``dense+ckpt``
(``model.activation_checkpointing = True``: every block recomputed in the backward pass).

What is counted. Parameters, buffers, the inputs and the target, and the ``.grad`` buffers
exist before the measured window (the grads are allocated up front and zeroed in place, as in
any step after the first; optimizer state is never touched by forward/backward), so none of
them is counted. The window is forward + MSE loss + backward; its peak is the most memory
allocated at any moment above what existed when it opened: activations kept for backward,
transient buffers of forward and backward ops, gradient temporaries before they are added
into ``.grad``, and under bf16 autocast's bf16 copies of the weights.

Those weight copies are no activations (their size does not depend on the tokens), yet they
are all alive together: autocast caches the cast of every parameter until the forward pass
leaves autocast, and each linear keeps its bf16 weight for backward. They are measured apart:
a dispatch mode records every storage autocast casts from a parameter during the forward pass
(the ``weight copies`` column: the cache at its fullest), and ``activation peak = peak -
weight copies`` (for fp32 the two are equal). Without checkpointing the peak falls at the
start of the backward pass, where the linears still keep every copy (only the bias copies, a
fraction of a per cent, are gone), so there the difference is the activation peak and the
compass target is judged on it. With checkpointing the bf16 peak falls at the end of the
forward pass, where the cache holds every copy; the difference is then a lower bound (a
block's recompute in backward re-casts only its own weights but holds its activations).
Both the measured peak and the difference are reported, each with its ratio to dense.

- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
  the CPU allocator with its size and time (the events its memory view is built from); the
  peak is the maximum over time of their running sum (bytes requested, not process RSS).
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the
  window (after ``reset_peak_memory_stats``), after one unmeasured warm-up pass per arm.

Cross-check (both devices): the bytes held for backward at the end of the forward pass, the
unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` plus, for checkpointed
arms, the block inputs the checkpoint keeps for its recompute (tensors saved inside a
checkpointed block go to the checkpoint's own hooks and are not kept).

The FLOP fraction is routed / dense forward FLOPs of tread's cost model (``tread.cost``, as in
``tread bench``); the compass target (issue 13) is routed / dense activation peak <= FLOP
fraction + 0.05.
A CUDA out-of-memory in one arm is recorded as that arm's error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import tread
from tread import Route
from tread.cost import forward_flops
from tread.routing import resolve_routes

MIB = 2**20
TARGET_MARGIN = 0.05  # compass target: routed / dense activation peak <= FLOP fraction + 0.05


@dataclass(frozen=True)
class Arm:
    """One measured configuration of the same model."""

    name: str
    routes: tuple[Route, ...]
    checkpoint: bool


@dataclass
class ArmResult:
    """Figures of one arm; ``error`` is set (and the figures None) when it failed (CUDA OOM)."""

    name: str
    routed: bool
    checkpointing: bool
    peak_mib: float | None = None  # measured peak of the window, max over the repeats
    peak_mib_runs: list[float] | None = None  # one per repeat (memory is deterministic)
    weight_copies_mib: float | None = None  # autocast's bf16 copies of the parameters
    activation_mib: float | None = None  # peak - weight copies
    saved_mib: float | None = None  # held for backward after forward, less weight copies
    ratio_to_dense: float | None = None  # peak_mib / dense peak_mib
    activation_ratio_to_dense: float | None = None  # activation_mib / dense activation_mib
    saved_ratio_to_dense: float | None = None
    flop_fraction: float | None = None  # forward FLOPs / dense forward FLOPs
    meets_target: bool | None = None  # activation ratio <= flop_fraction + 0.05 (routed arms)
    error: str | None = None


def arms_for(route: Route) -> list[Arm]:
    """The four arms: dense, routed, routed + checkpointing, dense + checkpointing."""
    return [
        Arm("dense", (), False),
        Arm("routed", (route,), False),
        Arm("routed+ckpt", (route,), True),
        Arm("dense+ckpt", (), True),
    ]


def make_inputs(
    model: nn.Module, batch: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random (x, t, y, target) at the model's input size, drawn from a seeded generator."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.input_size, config.input_size)  # (B, C, H, W)
    x = torch.randn(shape, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=generator)
    target = torch.randn(shape, generator=generator)
    return x.to(device), t.to(device), y.to(device), target.to(device)


def storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def existing_storages(model: nn.Module, tensors: Sequence[Tensor]) -> set[int]:
    """Storages that exist before the window: parameters, their grads, buffers, inputs."""
    keys = {storage_key(p) for p in model.parameters()}
    keys |= {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
    keys |= {storage_key(b) for b in model.buffers()}
    return keys | {storage_key(t) for t in tensors}


@contextlib.contextmanager
def kept_for_backward(
    model: nn.Module, checkpoint: bool, exclude: set[int]
) -> Iterator[dict[int, int]]:
    """Record the unique storages (key -> bytes) held for backward while the block runs.

    Every tensor autograd saves passes the pack hook; with ``checkpoint`` the block inputs
    (tokens, cond, aux) are added too, as the checkpoint keeps them for its recompute. Storages
    in ``exclude`` (parameters, inputs) existed before and are not counted. Record only the
    forward pass: leave the context before backward (recomputes would add their inputs again).
    """
    kept: dict[int, int] = {}

    def note(value: object) -> None:
        if isinstance(value, Tensor) and storage_key(value) not in exclude:
            kept[storage_key(value)] = value.untyped_storage().nbytes()

    def pack(tensor: Tensor) -> Tensor:
        note(tensor)
        return tensor

    def block_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            note(value)

    handles = []
    if checkpoint:
        for block in model.blocks:
            handles.append(block.register_forward_pre_hook(block_inputs, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield kept
    finally:
        for handle in handles:
            handle.remove()


class WeightCopies(TorchDispatchMode):
    """Record the storages of every cast of a parameter (autocast's low-precision copies)."""

    def __init__(self, parameters: set[int]) -> None:
        super().__init__()
        self.parameters = parameters  # storage keys of the parameters
        self.copies: dict[int, int] = {}  # storage key -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (
            func is torch.ops.aten._to_copy.default
            and isinstance(source, Tensor)
            and storage_key(source) in self.parameters
        ):
            self.copies[storage_key(out)] = out.untyped_storage().nbytes()
        return out


@dataclass
class Measurement:
    """One pass of one arm, in bytes."""

    peak: int  # peak of the window
    saved: int  # held for backward at the end of the forward pass, weight copies excluded
    weight_copies: int  # every cast of a parameter made in the forward pass


def cpu_peak_bytes(run: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations minus frees during ``run`` (profiler).

    Args:
        run: the measured window.

    Returns:
        Bytes above what was allocated when ``run`` started, at the worst moment.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes: list[tuple[int, int]] = []  # (time ns, +bytes allocated / -bytes freed)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    peak = total = 0
    for _, size in sorted(changes):
        total += size
        peak = max(peak, total)
    return peak


def cuda_peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """``max_memory_allocated`` during ``run`` minus what was allocated before it.

    Args:
        run: the measured window.
        device: the CUDA device it runs on.

    Returns:
        Bytes above what was allocated when ``run`` started, at the worst moment.
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_arm(
    model: nn.Module,
    arm: Arm,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    precision: str,
    seed: int,
) -> Measurement:
    """Memory of one forward + MSE loss + backward of ``arm`` (grads must exist already).

    Args:
        model: the backbone, in train mode; its ``activation_checkpointing`` is set for the
            pass and reset after.
        arm: routes and checkpointing of the pass.
        data: (x, t, y, target) on the model's device.
        precision: "fp32", or "bf16" (autocast around forward and loss).
        seed: seed of the kept-token plan (the same plan in every pass).

    Returns:
        The pass's :class:`Measurement`.
    """
    x, t, y, target = data
    device = x.device
    model.activation_checkpointing = arm.checkpoint
    exclude = existing_storages(model, data)
    bf16 = precision == "bf16"
    copies = WeightCopies({storage_key(p) for p in model.parameters()})
    saved: dict[int, int] = {}

    def run() -> None:
        generator = torch.Generator(device=device).manual_seed(seed)  # the same plan each time
        with (
            kept_for_backward(model, arm.checkpoint, exclude) as kept,
            copies if bf16 else contextlib.nullcontext(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            out = model(x, t, y, routes=list(arm.routes), generator=generator)
            loss = (out.float() - target).square().mean()
        saved.update(kept)
        loss.backward()

    try:
        peak = cuda_peak_bytes(run, device) if device.type == "cuda" else cpu_peak_bytes(run)
    finally:
        model.activation_checkpointing = False
    held = sum(size for key, size in saved.items() if key not in copies.copies)
    return Measurement(peak, held, sum(copies.copies.values()))


def zero_grads(model: nn.Module) -> None:
    """Allocate every ``.grad`` (zeros) so the window does not count them."""
    for parameter in model.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        else:
            parameter.grad.zero_()


def run_arm(
    model: nn.Module,
    arm: Arm,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    precision: str,
    seed: int,
    repeats: int,
    warmup: int,
) -> ArmResult:
    """Warm up, then measure ``arm`` ``repeats`` times; a CUDA OOM becomes the arm's error.

    Args:
        model, arm, data, precision, seed: as for :func:`measure_arm`.
        repeats: measured passes (memory is deterministic: they agree).
        warmup: unmeasured passes first (CUDA: cuBLAS workspace, kernel selection).

    Returns:
        The arm's figures (ratios are filled in later by :func:`add_ratios`).
    """
    result = ArmResult(arm.name, routed=bool(arm.routes), checkpointing=arm.checkpoint)
    try:
        for _ in range(warmup):
            zero_grads(model)
            measure_arm(model, arm, data, precision=precision, seed=seed)
        runs = []
        for _ in range(repeats):
            zero_grads(model)
            runs.append(measure_arm(model, arm, data, precision=precision, seed=seed))
    except torch.OutOfMemoryError as err:
        result.error = f"out of memory: {str(err).splitlines()[0]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    last = runs[-1]
    result.peak_mib_runs = [run.peak / MIB for run in runs]
    result.peak_mib = max(result.peak_mib_runs)
    result.weight_copies_mib = last.weight_copies / MIB
    result.activation_mib = result.peak_mib - result.weight_copies_mib
    result.saved_mib = last.saved / MIB
    return result


def add_ratios(results: list[ArmResult], flop_fraction: float) -> None:
    """Fill each arm's ratios to the dense arm, FLOP fraction and compass-target check."""
    dense = next(r for r in results if r.name == "dense")
    for result in results:
        result.flop_fraction = flop_fraction if result.routed else 1.0
        if result.activation_mib is None or dense.activation_mib is None:
            continue
        result.ratio_to_dense = result.peak_mib / dense.peak_mib
        result.activation_ratio_to_dense = result.activation_mib / dense.activation_mib
        result.saved_ratio_to_dense = result.saved_mib / dense.saved_mib
        if result.routed:
            ratio = result.activation_ratio_to_dense
            result.meets_target = ratio <= flop_fraction + TARGET_MARGIN


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(results: Sequence[ArmResult], *, copies: bool) -> str:
    """A markdown table of the arms; ``copies`` adds the weight-copy columns (bf16)."""
    extra = "| weight copies MiB | activation peak MiB | / dense " if copies else ""
    lines = [
        f"| arm | {'peak MiB' if copies else 'peak activation MiB'} | / dense {extra}"
        "| held for backward MiB | / dense "
        "| FLOP fraction | target (<= frac + 0.05) |",
        "|---|---:|---:|" + ("---:|---:|---:|" if copies else "") + "---:|---:|---:|---|",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.name} | error: {r.error} |" + " |" * (9 if copies else 6))
            continue
        if r.meets_target is None:
            target = "n/a"
        else:
            target = f"{'yes' if r.meets_target else 'NO'} (<= {r.flop_fraction + 0.05:.3f})"
        cells = [r.name, f"{r.peak_mib:.1f}", _cell(r.ratio_to_dense, ".3f")]
        if copies:
            cells += [
                f"{r.weight_copies_mib:.1f}",
                f"{r.activation_mib:.1f}",
                _cell(r.activation_ratio_to_dense, ".3f"),
            ]
        cells += [
            f"{r.saved_mib:.1f}",
            _cell(r.saved_ratio_to_dense, ".3f"),
            f"{r.flop_fraction:.3f}",
            target,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2", help="registry name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 tok)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--route-start", type=int, default=2)
    parser.add_argument("--route-end", type=int, default=-4)
    parser.add_argument("--ratio", type=float, default=0.5, help="share of tokens that skip")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=2, help="measured passes per arm")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unmeasured passes per arm first (default: 1 on CUDA, 0 on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
    model = tread.build_model(
        args.model,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = model.to(device).train()
    route = Route(args.route_start, args.route_end, args.ratio)
    data = make_inputs(model, args.batch, device, args.seed)
    results = [
        run_arm(
            model,
            arm,
            data,
            precision=precision,
            seed=args.seed,
            repeats=args.repeats,
            warmup=warmup,
        )
        for arm in arms_for(route)
    ]
    flop_fraction = forward_flops(model.config, [route]) / forward_flops(model.config)
    add_ratios(results, flop_fraction)
    resolved = resolve_routes([route], model.config.depth)[0]
    routed = next(r for r in results if r.name == "routed")
    report = {
        "model": args.model,
        "input_size": args.input_size,
        "tokens": model.config.num_tokens,
        "batch": args.batch,
        "route": {"start": resolved.start, "end": resolved.end, "ratio": route.ratio},
        "device": machine_name(device),
        "device_type": device.type,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "method": "cuda max_memory_allocated - allocated before"
        if device.type == "cuda"
        else "torch.profiler memory events: max running sum of allocations - frees",
        "flop_fraction": flop_fraction,
        "compass_target": flop_fraction + TARGET_MARGIN,
        "compass_target_met": routed.meets_target,
        "arms": [asdict(r) for r in results],
    }
    print(
        f"{args.model}, {model.config.num_tokens} tokens, batch {args.batch}, {precision}, "
        f"route r({resolved.start}->{resolved.end}) ratio {route.ratio}; "
        f"{report['device']}, {report['threads']} thread(s), torch {torch.__version__}"
    )
    print(format_table(results, copies=precision == "bf16"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, allow_nan=False)
            handle.write("\n")


if __name__ == "__main__":
    main()
