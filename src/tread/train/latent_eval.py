"""In-loop evaluation of a latent run (data.name=latents): which metric scores it, the checks of
its settings, and the latent FD scorer.

A latent run is scored either in latent space ("fd_latent", :mod:`tread.eval.latent`: no VAE,
no weights) or, with ``eval.feature_net=inception``, by the FID of its VAE-decoded samples
("fid", scored by the feature-net scorer of :mod:`tread.train.evaluation`).
:func:`tread.train.evaluation.default_eval_hook` calls these; this module imports from that one,
never the reverse at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .dist import DistInfo
from .evaluation import REFERENCE_SPLITS, Scorer, check_eval_inputs, generate_images

__all__ = [
    "LatentEvalKind",
    "check_eval_settings",
    "eval_metrics",
    "latent_eval_kind",
    "latent_fd_scorer",
    "latent_reference_for",
]

logger = logging.getLogger(__name__)

# How a latent run is scored in the loop: the Fréchet distance of pooled latents, or the FID
# of the VAE-decoded samples (eval.feature_net=inception). Also the metric's key in the log.
LatentEvalKind = Literal["fd_latent", "fid"]


def latent_eval_kind(config: Config) -> LatentEvalKind | None:
    """How the in-loop evaluation scores a run: None for pixel runs, else the latent metric.

    Raises:
        ConfigError: a packaged classifier named for a latent run (it scores small grey or
            pixel images, not latents nor decoded 256² RGB images).
    """
    if config.data.name != "latents":
        return None
    name = config.eval.feature_net
    if name is None:
        return "fd_latent"
    if name == "inception":
        return "fid"
    raise ConfigError(
        f"eval.feature_net={name!r} cannot score a latent run: leave it unset (Fréchet distance "
        "of latents, fd_latent) or set it to inception (FID of the VAE-decoded samples)"
    )


def eval_metrics(config: Config) -> tuple[str, ...]:
    """The metrics the in-loop evaluation logs (keys ``eval/<name>``), the main one first.

    Returns:
        ("fd", "acc") for a pixel run (a feature net's FD and conditional accuracy), else
        (:func:`latent_eval_kind`,): "fd_latent" or "fid", with no accuracy.

    Raises:
        ConfigError: see :func:`latent_eval_kind`.
    """
    kind = latent_eval_kind(config)
    return ("fd", "acc") if kind is None else (kind,)


def check_eval_settings(
    config: Config,
    *,
    inception_weights: str | Path | None = None,
    vae: str | Path | None = None,
) -> Path | None:
    """Every check of the in-loop evaluation's settings; nothing is loaded or written.

    Pixel runs: the feature net, its weights and the reference (:func:`check_eval_inputs`).
    Latent runs: for the latent FD, the reference (``train`` or a latent stats file); for FID,
    a reference file of real images, the Inception weights and the VAE folder.

    Args:
        config: the run config.
        inception_weights: pytorch-fid weights file (eval.feature_net=inception).
        vae: the VAE folder when ``eval.vae`` is unset (the CLI passes ``$TREAD_VAE``).

    Returns:
        The VAE folder that decodes the samples (latent FID), else None.

    Raises:
        ConfigError / DataError: a one-line message naming the setting or file.
    """
    from ..eval.latent import check_latent_reference, check_vae_folder

    kind = latent_eval_kind(config)
    if kind != "fid" and config.eval.vae is not None:
        what = "a pixel run" if kind is None else "the latent FD (eval.feature_net unset)"
        raise ConfigError(
            f"eval.vae={config.eval.vae} is only read for the FID of a latent run "
            f"(data.name=latents, eval.feature_net=inception); {what} decodes nothing"
        )
    if kind is None:
        check_eval_inputs(config, inception_weights=inception_weights)
        return None
    reference = config.eval.reference_split
    if kind == "fd_latent":
        check_latent_reference(reference)
        return None
    if reference in REFERENCE_SPLITS:
        raise ConfigError(
            f"eval.reference_split={reference}: the FID of a latent run compares decoded images "
            "with real ones; set it to a stats .npz or an ADM reference batch "
            "(e.g. VIRTUAL_imagenet256_labeled.npz)"
        )
    check_eval_inputs(config, inception_weights=inception_weights)  # weights, reference file
    origin = "eval.vae" if config.eval.vae else "$TREAD_VAE"
    return check_vae_folder(
        config.eval.vae or vae, channels=config.model.in_channels, origin=origin
    )


def latent_reference_for(config: Config, cache_dir: Path) -> Any:
    """The latent FD's reference statistics (see :func:`tread.eval.latent.latent_reference`)."""
    from ..eval.latent import latent_reference
    from .builders import load_data

    return latent_reference(
        config.eval.reference_split,
        lambda: load_data(config, "train"),
        cache_dir / "ref_latents_train_latent.npz",
        name=config.data.name,
    )


def latent_fd_scorer(
    config: Config, info: DistInfo, device: torch.device, *, progress: bool
) -> Scorer:
    """Scores a latent run by ``fd_latent``; rank 0 builds the reference at the first call."""
    from ..eval import sample_size_warnings
    from ..eval.latent import fd_latent

    built: dict[str, Any] = {}

    def score(model: nn.Module, resolved: Config, *, seed: int | None = None) -> dict[str, float]:
        if info.is_main and not built:
            built["reference"] = latent_reference_for(
                resolved, Path(resolved.train.run_dir) / "eval"
            )
            for message in sample_size_warnings(
                config.eval.num_samples, built["reference"], ("fd",)
            ):
                logger.warning("in-loop evaluation (fd_latent): %s", message)
        latents, _ = generate_images(
            model,
            resolved,
            config.eval.num_samples,
            seed=config.sample.seed if seed is None else seed,
            device=device,
            info=info,
            progress=progress,
        )  # (N, C, h, w) latents as the model outputs them, complete on rank 0
        if not info.is_main:
            return {}
        # No "acc": no classifier reads latents, and a made-up number would be worse than none.
        return {"fd_latent": fd_latent(latents, built["reference"])}

    return score
