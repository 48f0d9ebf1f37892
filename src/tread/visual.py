"""Image grids and training plots (matplotlib with the Agg backend; nothing opens a window)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, C, H, W) -> (B, H, W, C)


def save_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of (B, C, H, W) images in [-1, 1]; 1 or 3 channels; 2 px gaps.

    More than 3 channels (raw 4-channel VAE latents in training grids) shows the first three as
    RGB: a rough preview, not a decoded image.
    """
    pixels = to_uint8(images)
    if pixels.shape[-1] > 3:
        pixels = pixels[..., :3]  # (B, H, W, C) -> (B, H, W, 3); PIL would read 4 as RGBA
    B, H, W, C = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    pad = 2
    canvas = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for index in range(B):
        row, col = divmod(index, nrow)
        top, left = pad + row * (H + pad), pad + col * (W + pad)
        canvas[top : top + H, left : left + W] = pixels[index]
    image = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file (unreadable lines skipped: a run may be cut mid-line)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# The ``event`` of the metrics row a training writes before its first dense fine-tune step.
FINETUNE_EVENT = "finetune_start"


def finetune_switches(rows: Sequence[dict]) -> list[int]:
    """Steps at which a dense fine-tune phase started, from the rows of a metrics.jsonl."""
    return sorted({int(r["step"]) for r in rows if r.get("event") == FINETUNE_EVENT})


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Loss against step (raw and smoothed) from a metrics.jsonl file, written as PNG.

    A dense fine-tune switch (the paper's "(F)": routing off from that step, often with its own
    learning rate) is a dashed vertical line, so a change of the loss there reads as the phase's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every_row = read_metrics(metrics_path)
    rows = [r for r in every_row if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if rows:
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ax.plot(steps, loss, color="0.7", lw=0.8, label="loss (per log interval)")
        window = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", lw=1.6, label=f"moving mean ({window})")
        for step in finetune_switches(every_row):
            ax.axvline(step, color="C3", ls="--", lw=1.0, label=f"dense fine-tune from {step}")
        ax.set_yscale("log")
        ax.legend(frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]],
    out_path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """One line per named series of (x, y) points, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_panels(
    panels: Sequence[tuple[dict[str, Sequence[tuple[float, float]]], str]],
    out_path: str | Path,
    *,
    ylabel: str,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Side-by-side panels sharing the y axis, written as PNG.

    Args:
        panels: one ``(series, xlabel)`` per panel; ``series`` maps a line's name to its
            (x, y) points, as in :func:`plot_curves`.
        out_path: the PNG to write.
        ylabel: label of the shared y axis (left panel).
        title: figure title.
        log_y: logarithmic y axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3.8), dpi=120, sharey=True, squeeze=False
    )
    for ax, (series, xlabel) in zip(axes[0], panels, strict=True):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_xlabel(xlabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_image_row(images: dict[str, Path], out_path: str | Path) -> Path:
    """Image files in one row, each titled with its key, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 5.4), dpi=120, squeeze=False)
    for ax, (title, path) in zip(axes[0], images.items(), strict=True):
        with Image.open(path) as image:
            ax.imshow(image, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
