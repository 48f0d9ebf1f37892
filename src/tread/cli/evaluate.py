"""``tread eval``: generate samples from a checkpoint and score them (FD/FID, KID, P/R, IS, acc)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, get_args

from ..errors import ConfigError
from .common import (
    HelpFormatter,
    add_runtime_options,
    add_vae_option,
    dist_info,
    positive_int,
    resolve_device,
    vae_path,
)
from .guidance import add_guidance_options, guided_configs, parse_guidance

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate samples and compute FD/FID, KID, precision/recall, IS, accuracy",
        description="Evaluate a checkpoint against reference data with a feature network.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument(
        "--num-samples", type=positive_int, default=1000, help="samples generated and scored"
    )
    p.add_argument(
        "--feature-net",
        default=None,
        help="digits | fashion_mnist | inception (default: the dataset's classifier)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="pytorch-fid Inception weights file (default: $TREAD_INCEPTION_WEIGHTS)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="reference: dataset split 'test'/'train', a stats .npz, or an ADM batch "
        "(default: eval.reference_split of the run)",
    )
    p.add_argument(
        "--reference-moments",
        choices=("recompute", "file"),
        default="recompute",
        help="ADM batch: recompute mu/sigma from arr_0 with the feature net, or use the "
        "file's precomputed TF-Inception moments (recorded in the JSON)",
    )
    p.add_argument(
        "--metrics", default="fd,kid,pr,is,acc", help="comma-separated: fd,sfid,kid,pr,is,acc"
    )
    p.add_argument("--sampler", default=None, help="default: the run's sample.sampler")
    p.add_argument("--steps", type=positive_int, default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per sampler call")
    p.add_argument(
        "--out",
        default=None,
        help="JSON output (default: RUN_DIR/eval/...); for a sweep, the sweep table's JSON, "
        "with one STEM_MODE_gW.json per point beside it",
    )
    add_guidance_options(p, sweep=True)
    add_vae_option(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def parse_metrics(text: str) -> list[str]:
    """``fd,kid`` -> ["fd", "kid"]; unknown names are a one-line ConfigError."""
    from ..eval import MetricName

    known = get_args(MetricName)
    metrics = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise ConfigError(
            f"--metrics {text!r}: unknown {', '.join(unknown) or '(empty)'}; "
            f"choose from {','.join(known)}"
        )
    return metrics


def default_out(checkpoint: Path, step: int, net: str, args: argparse.Namespace, s: dict) -> Path:
    """``RUN_DIR/eval/step…_NET_nN_SAMPLERSTEPS_gG[_MODE…]_sSEED_ref….json``: outside
    checkpoints/. Sparse guidance adds its mode and ratios, an interval its bounds."""
    from ..train.evaluation import eval_dir

    name = (
        f"step{step:07d}_{net}_n{args.num_samples}_{s['sampler']}{s['steps']}"
        f"_{_guidance_tag(s)}_s{args.seed}_ref-{_reference_tag(args, s)}.json"
    )
    return eval_dir(checkpoint) / name


def _reference_tag(args: argparse.Namespace, s: dict) -> str:
    ref = Path(s["reference"]).stem if s["reference"] not in ("train", "test") else s["reference"]
    return ref + ("-file-moments" if args.reference_moments == "file" else "")


def _guidance_tag(s: dict) -> str:
    """``g1.5`` for CFG (the names of earlier records), ``g1.5-sg0-0.5-r2-5``-like otherwise."""
    tag = f"g{s['guidance']:g}"
    if s.get("guidance_mode", "cfg") != "cfg":
        mode = s["guidance_mode"].replace("+", "")
        tag += f"-{mode}{s['sg_strong_ratio']:g}-{s['sg_weak_ratio']:g}"
        tag += "".join(f"-r{a}-{b}" for a, b in s["sg_route"])
    if s.get("guidance_interval"):
        tag += "-i{:g}-{:g}".format(*s["guidance_interval"])
    return tag


def sweep_out(checkpoint: Path, step: int, net: str, args: argparse.Namespace, s: dict) -> Path:
    """Default sweep table: ``RUN_DIR/eval/sweep_step…_NET_nN_SAMPLERSTEPS_sSEED_ref….json``."""
    from ..train.evaluation import eval_dir

    name = (
        f"sweep_step{step:07d}_{net}_n{args.num_samples}_{s['sampler']}{s['steps']}"
        f"_s{args.seed}_ref-{_reference_tag(args, s)}.json"
    )
    return eval_dir(checkpoint) / name


def _settings(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings of one evaluation, as recorded (SG ones only in SG modes)."""
    sample = config.sample
    settings = {
        "sampler": args.sampler or sample.sampler,
        "steps": args.steps or sample.steps,
        "guidance": sample.guidance,
        "guidance_mode": sample.guidance_mode,
        "guidance_interval": sample.guidance_interval,
        "reference": args.reference or config.eval.reference_split,
    }
    sparse = config.sparse_guidance()
    if sparse is not None:
        settings["sg_strong_ratio"] = sparse.strong_ratio
        settings["sg_weak_ratio"] = sparse.weak_ratio
        settings["sg_route"] = [list(span) for span in sparse.spans]
    return settings


def run(args: argparse.Namespace) -> int:
    from ..eval import inception_weights_from_env
    from ..generate import cost_meter, latent_decoder_for
    from ..train.checkpoint import load_for_inference, resolve_checkpoint
    from ..train.dist import init_process_group
    from ..train.evaluation import (
        check_eval_inputs,
        eval_dir,
        evaluate_model,
        feature_net_for,
        reference_for,
    )

    metrics = parse_metrics(args.metrics)
    guidance = parse_guidance(args, sweep=True)
    info = dist_info()
    device = resolve_device(args.device, info.local_rank)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, config, step = load_for_inference(checkpoint, device)
    # One checked config per (mode, weight): a bad pair stops the job before any sample.
    points = [(c, _settings(c, args)) for c in guided_configs(config, *guidance)]
    sweep = len(points) > 1
    if sweep and "fd" not in metrics:
        raise ConfigError(f"--metrics {args.metrics!r}: a guidance sweep plots fd; add it")
    weights = args.inception_weights or inception_weights_from_env()
    # Every rank checks the inputs, so a bad one stops the job before any sample is drawn.
    check_eval_inputs(config, args.feature_net, args.reference, inception_weights=weights)
    vae = vae_path(args)
    decode = latent_decoder_for(config, vae, device)  # None: pixels
    init_process_group(info, device)
    net = reference = None
    outs: list[Path] = []
    if info.is_main:  # only rank 0 scores and writes: the others just generate their share
        net = feature_net_for(config, args.feature_net, inception_weights=weights, device=device)
        outs = _outs(checkpoint, step, net.name, args, [s for _, s in points])
        for out in outs:
            _check_out(out)
        reference = reference_for(
            config,
            net,
            args.reference,
            eval_dir(checkpoint),
            device,
            use_file_moments=args.reference_moments == "file",
        )
    rows = []
    for index, (point, settings) in enumerate(points):
        start = time.perf_counter()
        meter = cost_meter(model)
        result = evaluate_model(
            model,
            point,
            num_samples=args.num_samples,
            metrics=metrics,
            net=net,
            reference_stats=reference,
            seed=args.seed,
            device=device,
            batch_size=args.batch_size,
            info=info,
            progress=True,
            decode=decode,
            sampler=settings["sampler"],
            steps=settings["steps"],
            meter=meter,
        )
        if not info.is_main:
            continue
        assert net is not None and reference is not None
        record = {
            "checkpoint": str(checkpoint),
            "step": step,
            **_provenance(net.name, reference),
            "num_samples": args.num_samples,
            "seed": args.seed,
            **({"vae": str(vae)} if decode else {}),
            **settings,
            **meter.per_image(),  # this rank's share; every image costs the same
        }
        seconds = time.perf_counter() - start
        rows.append(_write_record(outs[index], record, result, reference, metrics, seconds=seconds))
    if sweep and info.is_main:
        _write_sweep(outs[-1], rows, checkpoint, step, args, points[0][1])
    return 0


def _outs(
    checkpoint: Path, step: int, net: str, args: argparse.Namespace, points: list[dict]
) -> list[Path]:
    """Where each point's record goes, then (for a sweep) the sweep table's JSON."""
    if len(points) == 1:
        only = Path(args.out) if args.out else default_out(checkpoint, step, net, args, points[0])
        return [only]
    if args.out:
        table = Path(args.out)
        tags = [f"{s['guidance_mode'].replace('+', '')}_g{s['guidance']:g}" for s in points]
        records = [table.with_name(f"{table.stem}_{tag}.json") for tag in tags]
    else:
        table = sweep_out(checkpoint, step, net, args, points[0])
        records = [default_out(checkpoint, step, net, args, s) for s in points]
    return [*records, table]


def _write_sweep(
    out: Path,
    records: list[dict[str, Any]],
    checkpoint: Path,
    step: int,
    args: argparse.Namespace,
    settings: dict[str, Any],
) -> None:
    """The sweep table (JSON + markdown) and its figure, and one line saying where they are."""
    from ..eval.sweep import sweep_row, write_sweep

    rows = [sweep_row(record, Path(record.pop("_path"))) for record in records]
    shared = {
        "checkpoint": str(checkpoint),
        "step": step,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "sampler": settings["sampler"],
        "steps": settings["steps"],
        "reference": settings["reference"],
        "feature_net": records[0]["feature_net"],
    }
    try:
        paths = write_sweep(rows, out, settings=shared, fd_name=records[0]["fd_is"])
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"sweep of {len(rows)} points -> {', '.join(str(p) for p in paths)}")


def _write_record(
    out: Path,
    record: dict[str, Any],
    result: dict[str, float],
    reference: Any,
    metrics: list[str],
    *,
    seconds: float,
) -> dict[str, Any]:
    """Add the scores and warnings to the record, write it atomically as strict JSON, print.

    Returns:
        The record as written, plus its path under ``_path`` (not written).
    """
    from ..eval import finite_metrics, sample_size_warnings
    from ..paths import atomic_open

    scores, warnings = finite_metrics(result)  # a NaN becomes null plus a warning
    warnings += sample_size_warnings(record["num_samples"], reference, metrics)
    for message in warnings:
        logger.warning(message)
    record = {**record, "metrics": scores, "warnings": warnings, "seconds": seconds}
    text = json.dumps(record, indent=2, allow_nan=False)  # NaN is not JSON: refuse it
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out) as handle:
            handle.write(text.encode())
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"step {record['step']} | {_summary(scores, record)} -> {out}")
    return {**record, "_path": str(out)}


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any sample is generated."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .json file name")


def _provenance(net_name: str, reference: Any) -> dict[str, Any]:
    """What was compared with what: the nets behind each side and where the moments came from."""
    return {
        "feature_net": net_name,
        "fd_is": "FID" if net_name.startswith("inception") else "FD",
        "generated_features": net_name,
        "reference_features": reference.moments_net or reference.net or "unknown",
        "reference_stats_source": reference.moments_source or "stats file without provenance",
        "reference_samples": reference.num_samples,
        "preprocessing": "both sides quantised to uint8 before the feature net",
    }


def _summary(scores: dict[str, float | None], record: dict[str, Any]) -> str:
    """One line: ``FD 12.345, KID 0.1, ... | n=1000 edm_heun steps=18 ... | NFE/image ...``."""
    from ..generate import describe_cost

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    labels = {"sfid": "sFD", "kid_mean": "KID", "precision": "P", "recall": "R", "is_mean": "IS"}
    parts = [f"{record['fd_is']} {fmt(scores['fd'], '.3f')}"] if "fd" in scores else []
    parts += [
        f"{label} {fmt(scores[key], '.4g')}" for key, label in labels.items() if key in scores
    ]
    parts += [f"acc {fmt(scores['acc'], '.4g')}"] if "acc" in scores else []
    guidance = f"{record['guidance']:g}"
    if record.get("guidance_mode", "cfg") != "cfg":
        spans = ",".join(f"{a}..{b}" for a, b in record["sg_route"])
        guidance += (
            f" mode={record['guidance_mode']} ratios={record['sg_strong_ratio']:g}"
            f"->{record['sg_weak_ratio']:g} route={spans}"
        )
    if record.get("guidance_interval"):
        guidance += " interval=[{:g}, {:g}]".format(*record["guidance_interval"])
    return (
        f"{', '.join(parts)} | n={record['num_samples']} {record['sampler']} "
        f"steps={record['steps']} guidance={guidance} seed={record['seed']} "
        f"net={record['feature_net']} | {describe_cost(record)}"
    )
