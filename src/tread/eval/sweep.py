"""Guidance sweeps: one evaluation per (mode, weight) pair, gathered into a table and a figure.

The figure has FD against the guidance weight omega and FD against the forward FLOPs per image,
one line per guidance mode, so "SG reaches CFG's best FD at fewer FLOPs" can be read off it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..paths import atomic_open

# Columns of the markdown table besides mode / weight / FD / cost, as (metric key, header).
EXTRA_COLUMNS = (("acc", "acc"), ("precision", "P"), ("recall", "R"), ("is_mean", "IS"))


def sweep_row(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The sweep-table row of one evaluation record (as ``tread eval`` writes it).

    Args:
        record: the evaluation record (settings, ``metrics``, cost per image).
        path: where the record was written.

    Returns:
        ``{"guidance_mode", "guidance", "metrics", "nfe_per_image", "flops_per_image",
        "record"}`` plus the SG settings when the mode has them.
    """
    keys = ("guidance_mode", "guidance", "guidance_interval", "sg_strong_ratio", "sg_weak_ratio")
    row = {key: record[key] for key in (*keys, "sg_route") if key in record}
    row.update(
        metrics=record["metrics"],
        nfe_per_image=record.get("nfe_per_image"),
        flops_per_image=record.get("flops_per_image"),
        record=str(path),
    )
    return row


def best_per_mode(rows: Sequence[dict[str, Any]], metric: str = "fd") -> dict[str, dict]:
    """The row with the lowest ``metric`` for each guidance mode (rows without it skipped)."""
    best: dict[str, dict] = {}
    for row in rows:
        value = row["metrics"].get(metric)
        if value is None or not math.isfinite(value):
            continue
        mode = row["guidance_mode"]
        if mode not in best or value < best[mode]["metrics"][metric]:
            best[mode] = row
    return best


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def sweep_markdown(rows: Sequence[dict[str, Any]], fd_name: str = "FD") -> str:
    """A markdown table of the sweep, one line per (mode, weight), best FD per mode in bold.

    Args:
        rows: rows from :func:`sweep_row`.
        fd_name: "FD" or "FID" (what the feature net makes of the distance).

    Returns:
        The table text, ending in a newline.
    """
    extra = [(k, h) for k, h in EXTRA_COLUMNS if any(k in r["metrics"] for r in rows)]
    header = ["mode", "ω", fd_name, *(h for _, h in extra), "NFE/image", "GFLOPs/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {id(row) for row in best_per_mode(rows).values()}
    for row in rows:
        fd = _cell(row["metrics"].get("fd"), ".3f")
        flops = row["flops_per_image"]
        cells = [
            row["guidance_mode"],
            f"{row['guidance']:g}",
            f"**{fd}**" if id(row) in best else fd,
            *(_cell(row["metrics"].get(key), ".4g") for key, _ in extra),
            _cell(row["nfe_per_image"], "g"),
            _cell(None if flops is None else flops / 1e9, ".4g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict[str, Any]], out: str | Path, *, fd_name: str = "FD") -> Path:
    """FD vs omega and FD vs GFLOPs per image, one line per guidance mode, as one PNG.

    Args:
        rows: rows from :func:`sweep_row`.
        out: the PNG to write.
        fd_name: y-axis label ("FD" or "FID").

    Returns:
        ``out``.
    """
    from ..visual import plot_panels

    priced = [r["flops_per_image"] for r in rows if r["flops_per_image"] is not None]
    # Tiny models cost MFLOPs, ImageNet ones GFLOPs: label the axis in a unit that reads.
    scale, unit = (1e9, "GFLOPs") if max(priced, default=0) >= 1e9 else (1e6, "MFLOPs")
    by_weight: dict[str, list[tuple[float, float]]] = {}
    by_flops: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        fd, flops, mode = row["metrics"].get("fd"), row["flops_per_image"], row["guidance_mode"]
        if fd is None:
            continue
        by_weight.setdefault(mode, []).append((row["guidance"], fd))
        if flops is not None:
            by_flops.setdefault(mode, []).append((row["guidance"], flops / scale, fd))
    panels = [({m: sorted(p) for m, p in by_weight.items()}, "guidance weight ω")]
    if by_flops:
        # Points joined in order of omega, so each line traces its mode's sweep.
        series = {m: [(x, y) for _, x, y in sorted(p)] for m, p in by_flops.items()}
        panels.append((series, f"forward {unit} per image"))
    return plot_panels(panels, out, ylabel=fd_name, title=f"{fd_name} across guidance")


def write_sweep(
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    settings: dict[str, Any],
    fd_name: str = "FD",
) -> list[Path]:
    """Write the sweep as JSON (``out``), a markdown table and a figure beside it.

    Args:
        rows: rows from :func:`sweep_row`, in evaluation order.
        out: the JSON path; the table is ``out`` with ``.md``, the figure with ``.png``.
        settings: what all rows share (checkpoint, sampler, steps, seed, feature net, ...).
        fd_name: "FD" or "FID".

    Returns:
        The written paths: JSON, markdown, PNG.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = {mode: row["guidance"] for mode, row in best_per_mode(rows).items()}
    payload = {**settings, "best_guidance_by_fd": best, "points": list(rows)}
    with atomic_open(out) as handle:
        handle.write(json.dumps(payload, indent=2, allow_nan=False).encode())
    table = out.with_suffix(".md")
    with atomic_open(table) as handle:
        handle.write(sweep_markdown(rows, fd_name).encode())
    figure = plot_sweep(rows, out.with_suffix(".png"), fd_name=fd_name)
    return [out, table, figure]
