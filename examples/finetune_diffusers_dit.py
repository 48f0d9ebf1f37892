"""Fine-tune a diffusers ``DiTTransformer2DModel`` on digits, dense vs TREAD-routed, on a CPU.

Both arms start from the same weights and see the same batches, noise levels, noise and label
dropout; the routed arm differs only by :func:`tread.integrations.diffusers.enable_routing`
(half of the tokens skip blocks 2..depth-4 by default). The two arms train step by step in
turn (alternating which goes first), so machine noise hits both alike. Then each arm's EMA
weights are sampled with tread's sampler and scored with tread's evaluation: the Fréchet
distance (FD) in the packaged digits classifier's feature space and the classifier's accuracy
on the conditioning labels (``tread eval`` computes the same numbers).

    python examples/finetune_diffusers_dit.py                      # a few minutes on a CPU
    python examples/finetune_diffusers_dit.py --objective flow --steps 600 --out summary.json
    python examples/finetune_diffusers_dit.py --pretrained /path/to/dit_folder

By default the model is a random-init DiT from the constructor (8 blocks, 4 heads x 32,
patch 1: 64 tokens of the 8x8 digits), as no pretrained DiT of digits' shape exists offline.
``--pretrained PATH`` loads ``DiTTransformer2DModel.from_pretrained(PATH)`` from a local folder
(never a download): that is how you fine-tune your own DiT. It must take 1-channel 8x8 inputs
(digits are pixels); a latent DiT (e.g. DiT-XL-2-256, 4 channels) needs your latents instead of
digits, with the same code. A learned-variance output (out_channels = 2 x in_channels) is fine:
its extra channels are dropped (``tread.transport.types.prediction_channels``).

The network contract of tread's objectives is ``net(x, t, y)``; :class:`DiffusersNet` turns
that into the diffusers call. ``t`` is the objective's conditioning value (EDM: ln(sigma)/4,
flow matching: t in [0, 1]); diffusers' DiT embeds ``timestep`` with sinusoids made for DDPM's
0..999, so it gets ``t * --timestep-scale`` (default 1000, as Flux and SD3 scale their flow t).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tread import Route
from tread.bench import counted_forward_flops
from tread.cli.common import set_threads
from tread.config import load_config
from tread.data import BatchStream, ImageArrays
from tread.data.digits import load_digits
from tread.errors import ConfigError, TreadError
from tread.eval import reference_stats
from tread.integrations.diffusers import RoutingHandle, enable_routing
from tread.train.builders import objective_from_config, with_data_shape
from tread.train.ema import ema_decay, make_ema, update_ema
from tread.train.evaluation import evaluate_model, feature_net_for

SAMPLERS = {"edm": "edm_heun", "flow": "flow_heun"}
ARMS = ("dense", "routed")


class DiffusersNet(nn.Module):
    """tread's network contract ``net(x, t, y)`` over a diffusers DiT's forward.

    Args:
        transformer: a ``DiTTransformer2DModel``.
        timestep_scale: diffusers' timestep = the objective's ``t`` times this.
    """

    def __init__(self, transformer: nn.Module, timestep_scale: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.timestep_scale = timestep_scale

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) float, y (B,) long -> (B, C_out, H, W) raw output."""
        timestep = t * self.timestep_scale  # (B,): diffusers' sinusoids expect DDPM's 0..999
        return self.transformer(hidden_states=x, timestep=timestep, class_labels=y).sample


@dataclass
class Arm:
    """One arm's model, optimizer, EMA, data stream and generators, and what it measured."""

    name: str
    net: DiffusersNet
    optimizer: torch.optim.Optimizer
    ema: nn.Module
    stream: BatchStream
    loss_gen: torch.Generator  # noise levels and noise of the objective
    rng_state: Tensor  # the global RNG of this arm (diffusers' DiT draws label dropout from it)
    handle: RoutingHandle | None = None
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The example's options (``argv`` None: the command line)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pretrained", default=None, help="local DiTTransformer2DModel folder")
    p.add_argument("--objective", choices=tuple(SAMPLERS), default="edm")
    p.add_argument("--steps", type=int, default=300, help="training steps per arm")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW rate after a linear warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route-start", type=int, default=2, help="first routed block")
    p.add_argument("--route-end", type=int, default=-4, help="last routed block (<0: from end)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of tokens that skip")
    p.add_argument("--samples", type=int, default=300, help="samples per arm for FD / accuracy")
    p.add_argument("--sample-steps", type=int, default=18, help="sampler steps")
    p.add_argument("--timestep-scale", type=float, default=1000.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: auto)")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    for key in ("steps", "batch", "samples", "sample_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def build_transformer(pretrained: str | None, data: ImageArrays) -> nn.Module:
    """The DiT to fine-tune: ``from_pretrained`` of a local folder, else a random init.

    Raises:
        ConfigError: the folder is missing, or its model does not fit the data.
    """
    from diffusers import DiTTransformer2DModel

    if pretrained is None:
        channels, size, _ = data.shape
        return DiTTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=channels,
            out_channels=channels,
            num_layers=8,
            sample_size=size,
            patch_size=1,  # 8x8 digits -> 64 tokens, as tread's digits presets
            num_embeds_ada_norm=data.num_classes,
        )
    if not Path(pretrained, "config.json").is_file():
        raise ConfigError(f"--pretrained {pretrained}: no config.json (a save_pretrained folder)")
    model = DiTTransformer2DModel.from_pretrained(pretrained, local_files_only=True)
    config = model.config
    if config.in_channels != data.shape[0] or (config.num_embeds_ada_norm or 0) < data.num_classes:
        raise ConfigError(
            f"--pretrained {pretrained}: in_channels={config.in_channels}, "
            f"num_embeds_ada_norm={config.num_embeds_ada_norm}, but {data.name} has "
            f"{data.shape[0]} channel(s) and {data.num_classes} classes"
        )
    return model


def make_arms(args: argparse.Namespace, transformer: nn.Module, data: ImageArrays) -> list[Arm]:
    """Both arms from one set of weights; the routed one gets the routing hooks."""
    arms = []
    for name in ARMS:
        model = copy.deepcopy(transformer).train()
        ema = make_ema(model)  # before the hooks: the EMA copy samples dense
        handle = None
        if name == "routed":
            route_gen = torch.Generator().manual_seed(args.seed + 1)
            try:
                route = Route(args.route_start, args.route_end, args.ratio)
                handle = enable_routing(model, [route], generator=route_gen)
            except ValueError as err:
                raise ConfigError(f"--route-start/--route-end/--ratio: {err}") from None
        arms.append(
            Arm(
                name=name,
                net=DiffusersNet(model, args.timestep_scale),
                optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
                ema=ema,
                stream=BatchStream(data, args.batch, seed=args.seed),
                loss_gen=torch.Generator().manual_seed(args.seed),
                rng_state=torch.Generator().manual_seed(args.seed).get_state(),
                handle=handle,
            )
        )
    return arms


def train_step(arm: Arm, objective: Any, step: int, lr: float, warmup: int) -> None:
    """One optimizer step of one arm, timed; the arm's own global-RNG state is swapped in."""
    for group in arm.optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup)
    start = time.perf_counter()
    torch.set_rng_state(arm.rng_state)
    x0, y = next(arm.stream)  # (B, 1, 8, 8) in [-1, 1], (B,)
    loss = objective.loss(arm.net, x0, y, arm.loss_gen).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(arm.net.parameters(), 1.0)
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    update_ema(arm.ema, arm.net.transformer, ema_decay(step, 0.999, warmup=True))
    arm.rng_state = torch.get_rng_state()
    arm.step_seconds.append(time.perf_counter() - start)
    arm.losses.append(loss.item())


def ideal_speedup(arms: list[Arm], data: ImageArrays, batch: int) -> float:
    """Dense / routed FLOPs of one training-mode forward, counted (see ``tread bench``)."""
    x0, y = data.take(torch.arange(batch))  # (B, 1, 8, 8), (B,)
    t = torch.zeros(batch)
    flops = [counted_forward_flops(lambda net=arm.net: net(x0, t, y)) for arm in arms]
    return flops[0] / flops[1]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both arms, sample and score them, print a table.

    Args:
        argv: options as on the command line (None: ``sys.argv``).

    Returns:
        The summary (also written to ``--out``): per arm ``it_s`` (training steps per second,
        median), ``final_loss`` (mean of the last 25 steps), ``fd`` and ``acc``; ``speedup``
        (routed / dense it/s) and ``ideal_speedup`` (counted FLOPs), and the settings.
    """
    args = parse_args(argv)
    threads = set_threads(args.threads)
    data = load_digits("train")
    overrides = [
        f"objective.name={args.objective}",
        f"sample.sampler={SAMPLERS[args.objective]}",
        f"sample.steps={args.sample_steps}",
        f"sample.seed={args.seed}",
        f"eval.num_samples={args.samples}",
    ]
    config = with_data_shape(load_config("digits_dit", overrides), data)  # sampling settings
    objective = objective_from_config(config)
    torch.manual_seed(args.seed)  # the random init (ignored with --pretrained)
    arms = make_arms(args, build_transformer(args.pretrained, data), data)
    depth = arms[1].handle.depth
    route = arms[1].handle.routes[0]
    print(
        f"{args.objective} objective, {depth}-block DiT, {len(data)} digits, batch {args.batch}, "
        f"{args.steps} steps per arm, route r({route.start}->{route.end}, {route.ratio:g}), "
        f"{threads} thread(s)"
    )
    ideal = ideal_speedup(arms, data, args.batch)

    warmup = max(1, min(100, args.steps // 10))
    for step in range(args.steps):
        order = arms if step % 2 == 0 else arms[::-1]  # alternate which arm goes first
        for arm in order:
            train_step(arm, objective, step, args.lr, warmup)
        if (step + 1) % max(1, args.steps // 8) == 0 or step + 1 == args.steps:
            losses = "  ".join(f"{a.name} {statistics.fmean(a.losses[-25:]):.4f}" for a in arms)
            print(f"step {step + 1:>5}/{args.steps}  loss (last 25): {losses}", flush=True)

    feature_net = feature_net_for(config)
    reference = reference_stats("digits", "test", feature_net)
    results: dict[str, Any] = {}
    for arm in arms:
        if arm.handle is not None:
            arm.handle.remove()  # not needed to sample (eval mode is dense); just tidy
        scores = evaluate_model(
            DiffusersNet(arm.ema, args.timestep_scale),
            config,
            num_samples=args.samples,
            metrics=("fd", "acc"),
            net=feature_net,
            reference_stats=reference,
            seed=args.seed,
        )
        results[arm.name] = {
            "it_s": 1.0 / statistics.median(arm.step_seconds),
            "final_loss": statistics.fmean(arm.losses[-25:]),
            "fd": scores["fd"],
            "acc": scores["acc"],
        }
    summary = {
        "objective": args.objective,
        "pretrained": args.pretrained,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "threads": threads,
        "samples": args.samples,
        "depth": depth,
        "route": {"start": route.start, "end": route.end, "ratio": route.ratio},
        **results,
        "speedup": results["routed"]["it_s"] / results["dense"]["it_s"],
        "ideal_speedup": ideal,
    }
    print_summary(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """One line per arm, then the speed-up beside its ideal."""
    print(f"\n{'arm':<7} {'step it/s':>9} {'loss':>8} {'FD':>8} {'acc':>6}")
    for name in ARMS:
        arm = summary[name]
        loss, fd, acc = arm["final_loss"], arm["fd"], arm["acc"]
        print(f"{name:<7} {arm['it_s']:>9.2f} {loss:>8.4f} {fd:>8.3f} {acc:>6.3f}")
    print(
        f"speed-up {summary['speedup']:.3f}x (ideal {summary['ideal_speedup']:.3f}x, counted "
        f"FLOPs; {summary['samples']} samples per arm for FD / accuracy)"
    )


if __name__ == "__main__":
    try:
        main()
    except TreadError as err:
        raise SystemExit(f"finetune_diffusers_dit: error: {err}") from None
