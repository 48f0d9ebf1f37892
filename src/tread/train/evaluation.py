"""Sample-quality evaluation of a model: generation + metrics, for training and ``tread eval``.

Generation uses per-sample seeds and class-balanced labels (0, 1, ..., K-1, 0, ...), so a number
is reproducible from the recorded (checkpoint, sampler, steps, guidance, seed, count).

In-loop evaluation scores a pixel run with a feature net ("fd", "acc"), and a latent run either
in latent space ("fd_latent", :mod:`tread.eval.latent`: no VAE, no weights) or, with
``eval.feature_net=inception``, by the FID of its VAE-decoded samples ("fid"); the latent-run
pieces (metric choice, settings checks, latent FD scorer) are in :mod:`tread.train.latent_eval`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, get_args

import numpy as np
import torch
from torch import nn

from ..config import Config, ReferenceSplit
from ..errors import ConfigError, DataError
from .dist import DistInfo
from .loop import EvalHook

logger = logging.getLogger(__name__)

PACKAGED_NETS = ("digits", "fashion_mnist")
# Dataset splits a reference may name (anything else is a stats file or an ADM batch).
REFERENCE_SPLITS: tuple[str, ...] = get_args(ReferenceSplit)


def eval_device(config: Config, info: DistInfo | None = None) -> torch.device:
    """This rank's device for evaluation: ``cuda:LOCAL_RANK`` on CUDA, else the CPU.

    An unindexed "cuda" would mean GPU 0 on every rank of a multi-GPU job.
    """
    info = info or DistInfo()
    if config.train.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def eval_dir(checkpoint: Path) -> Path:
    """Where eval outputs of a checkpoint go: ``RUN_DIR/eval`` (safe from checkpoint rotation).

    A checkpoint outside a run directory (not ``.../checkpoints/step_*``) gets ``eval/`` beside it.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval"
    return checkpoint.parent / "eval"


def feature_net_name(config: Config, name: str | None = None) -> str:
    """The feature net an evaluation uses: `name`, else eval.feature_net, else the dataset's."""
    return name or config.eval.feature_net or config.data.name


def check_eval_inputs(
    config: Config,
    feature_net: str | None = None,
    reference: str | None = None,
    *,
    inception_weights: str | Path | None = None,
) -> None:
    """Cheap checks of the feature net and reference, so a bad setting fails before any work.

    Nothing is loaded or written: the training hook runs this when it is created and ``tread
    eval`` before it generates a sample.

    Raises:
        ConfigError / DataError: a one-line message naming the setting or file.
    """
    name = feature_net_name(config, feature_net)
    if name == "inception":
        if inception_weights is None or not Path(inception_weights).is_file():
            where = "not given" if inception_weights is None else f"not found: {inception_weights}"
            raise DataError(
                f"feature net 'inception': Inception weights {where} (pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth; see docs/evaluation.md)"
            )
    elif name not in PACKAGED_NETS:
        raise ConfigError(
            f"no packaged feature net for {name!r}; use --feature-net / eval.feature_net "
            f"{' | '.join((*PACKAGED_NETS, 'inception'))}"
        )
    check_reference(config, reference)


def check_reference(config: Config, reference: str | None = None) -> None:
    """Check a reference (dataset split, stats file or ADM batch) without reading its data."""
    reference = reference or config.eval.reference_split
    if reference in REFERENCE_SPLITS:
        if config.data.name == "latents":
            # The split holds latents, not images: the feature net cannot score them.
            raise ConfigError(
                "a latent model is scored on decoded images: pass --reference with a stats "
                ".npz or an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)"
            )
        return
    if not Path(reference).is_file():
        raise ConfigError(f"reference {reference!r} is neither 'train'/'test' nor a file")
    from ..eval import reference_file_kind

    reference_file_kind(reference)  # DataError unless a stats file or an ADM batch


def feature_net_for(
    config: Config,
    name: str | None = None,
    *,
    inception_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
):
    """The feature network: a packaged classifier (default: the dataset's) or Inception-v3."""
    from ..eval import load_classifier, load_inception

    name = feature_net_name(config, name)
    if name == "inception":
        return load_inception(inception_weights, device=device)
    if name not in PACKAGED_NETS:
        raise ConfigError(
            f"no packaged feature net for {name!r}; use --feature-net "
            f"{' | '.join((*PACKAGED_NETS, 'inception'))}"
        )
    return load_classifier(name, device=device)


def reference_for(
    config: Config,
    net: Any,
    reference: str | None,
    cache_dir: Path,
    device: torch.device,
    *,
    use_file_moments: bool = False,
):
    """Reference statistics: a dataset split (cached), a stats file, or an ADM batch.

    An ADM batch's moments are recomputed from its ``arr_0`` images with `net` unless
    `use_file_moments` (see :func:`tread.eval.adm_reference_stats`).
    """
    from ..eval import adm_reference_stats, load_stats, reference_file_kind, reference_stats

    check_reference(config, reference)
    reference = reference or config.eval.reference_split
    if reference in REFERENCE_SPLITS:
        # "_u8": stats of uint8-quantised images; caches of older versions are not reused.
        cache = cache_dir / f"ref_{config.data.name}_{reference}_{net.name}_u8.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        return reference_stats(
            config.data.name, reference, net, cache, data_path=config.data.path, device=device
        )
    path = Path(reference)
    if reference_file_kind(path) == "adm":
        return adm_reference_stats(path, net, device=device, use_file_moments=use_file_moments)
    stats = load_stats(path)
    if stats.net and stats.net != net.name:  # refuse now, not after generating every sample
        raise DataError(f"{path}: stats of {stats.net!r} features cannot score {net.name!r} ones")
    return stats


def generate_images(
    model: nn.Module,
    config: Config,
    num_samples: int,
    *,
    seed: int,
    device: torch.device,
    batch_size: int = 256,
    info: DistInfo | None = None,
    progress: bool = False,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **sampling: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``num_samples`` class-balanced samples; under torchrun each rank makes a share.

    ``decode`` maps each generated batch to images (the VAE decoder of a latent model, see
    :func:`tread.generate.latent_decoder_for`); None keeps the samples as they are.

    Returns:
        (images (N, C, H, W) in [-1, 1] on CPU, labels (N,)) — complete on rank 0.
    """
    from ..generate import generate, sample_labels

    info = info or DistInfo()
    labels = sample_labels(num_samples, config.model.num_classes)
    mine = list(range(info.rank, num_samples, info.world_size))
    batches = generate(
        model,
        config,
        [labels[i] for i in mine],
        [seed + i for i in mine],
        batch_size=batch_size,
        device=device,
        progress=progress and info.is_main,
        **sampling,
    )
    images = torch.cat([(decode(x) if decode else x).float().cpu() for x, _ in batches])
    if info.enabled:
        import torch.distributed as dist

        shards: list[Any] = [None] * info.world_size
        dist.all_gather_object(shards, (mine, images))
        order = np.argsort(np.concatenate([np.asarray(idx) for idx, _ in shards]))
        images = torch.cat([imgs for _, imgs in shards])[torch.from_numpy(order)]
    return images, torch.tensor(labels)


def evaluate_model(
    model: nn.Module,
    config: Config,
    *,
    num_samples: int,
    metrics: Sequence[str],
    net: Any,
    reference_stats: Any,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    info: DistInfo | None = None,
    progress: bool = False,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **sampling: Any,
) -> dict[str, float]:
    """Generate samples and compute ``metrics`` against ``reference_stats`` (rank 0 result).

    ``decode``: see :func:`generate_images` (required to score a latent model).
    """
    from ..eval import compute_metrics

    device = torch.device(device)
    images, labels = generate_images(
        model,
        config,
        num_samples,
        seed=seed,
        device=device,
        batch_size=batch_size,
        info=info,
        progress=progress,
        decode=decode,
        **sampling,
    )
    if info is not None and not info.is_main:
        return {}
    return compute_metrics(
        images,
        net,
        reference_stats,
        labels=labels,
        metrics=metrics,
        batch_size=batch_size,
        device=device,
        kid_subset_size=min(1000, num_samples),
        quantize=True,  # score the uint8 images a user would save, as ADM / pytorch-fid do
    )


class Scorer(Protocol):
    """Scores a model: generates ``eval.num_samples`` samples and computes the run's metrics.

    ``score(model, resolved, seed=None)`` returns {metric: value} on rank 0 and {} on the other
    ranks; ``seed`` is the first per-sample seed (None = ``sample.seed``, as in the loop).
    """

    def __call__(
        self, model: nn.Module, resolved: Config, *, seed: int | None = None
    ) -> dict[str, float]: ...


def _image_scorer(
    config: Config,
    info: DistInfo,
    device: torch.device,
    *,
    progress: bool,
    inception_weights: str | Path | None,
    vae: Path | None,
) -> Scorer:
    """Scores with a feature net: FD + acc of a pixel run, FID of a latent run's decoded samples.

    Every rank builds the decoder at the first call (each decodes its share); rank 0 alone the
    feature net and the reference statistics (cached in ``RUN_DIR/eval/``).
    """
    from ..eval import sample_size_warnings
    from ..generate import latent_decoder_for

    built: dict[str, Any] = {}

    def score(model: nn.Module, resolved: Config, *, seed: int | None = None) -> dict[str, float]:
        if not built:
            # None for pixel runs; a latent run decodes with the VAE, divided by latent_scale.
            built["decode"] = latent_decoder_for(resolved, vae, device) if vae else None
            if info.is_main:
                net = feature_net_for(resolved, inception_weights=inception_weights, device=device)
                cache_dir = Path(resolved.train.run_dir) / "eval"
                built["net"] = net
                built["reference"] = reference_for(resolved, net, None, cache_dir, device)
                for message in sample_size_warnings(
                    config.eval.num_samples, built["reference"], ("fd",)
                ):
                    logger.warning("in-loop evaluation: %s", message)
        result = evaluate_model(
            model,
            resolved,
            num_samples=config.eval.num_samples,
            # Inception's 1008 TF-graph classes are no conditional labels: no acc for FID.
            metrics=("fd",) if vae else ("fd", "acc"),
            net=built.get("net"),
            reference_stats=built.get("reference"),
            seed=config.sample.seed if seed is None else seed,
            device=device,
            info=info,
            progress=progress,
            decode=built["decode"],
        )
        if vae and "fd" in result:
            result["fid"] = result.pop("fd")  # Inception features of decoded images: FID
        return result

    return score


def make_scorer(
    config: Config,
    info: DistInfo | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    inception_weights: str | Path | None = None,
    vae: str | Path | None = None,
) -> Scorer:
    """The in-loop evaluation's scorer, also what scores a final model at other sample seeds.

    Settings are checked here (:func:`tread.train.latent_eval.check_eval_settings`); the feature
    net, decoder and reference are built at the first call: making it loads and writes nothing.

    Args:
        config, info, progress, inception_weights, vae: as for :func:`default_eval_hook`.
        device: where to generate and score (default: :func:`eval_device`).

    Returns:
        The :class:`Scorer` of the metrics :func:`tread.train.latent_eval.eval_metrics` names.

    Raises:
        ConfigError / DataError: a bad setting.
    """
    # Imported here: latent_eval imports this module's helpers at its top.
    from .latent_eval import check_eval_settings, latent_eval_kind, latent_fd_scorer

    info = info or DistInfo()
    vae_folder = check_eval_settings(config, inception_weights=inception_weights, vae=vae)
    device = torch.device(device) if device is not None else eval_device(config, info)
    if latent_eval_kind(config) == "fd_latent":
        return latent_fd_scorer(config, info, device, progress=progress)
    return _image_scorer(
        config,
        info,
        device,
        progress=progress,
        inception_weights=inception_weights,
        vae=vae_folder,
    )


def default_eval_hook(
    config: Config,
    info: DistInfo | None = None,
    *,
    progress: bool = False,
    inception_weights: str | Path | None = None,
    vae: str | Path | None = None,
) -> EvalHook:
    """Hook for the training loop: sample quality of the EMA model every K steps.

    Pixel runs log "fd" and "acc" (conditional accuracy) of a feature net; latent runs log
    "fd_latent" (Fréchet distance of pooled latents to the training latents, see
    :mod:`tread.eval.latent`) or, with ``eval.feature_net=inception``, "fid" of the
    VAE-decoded samples (see :func:`tread.train.latent_eval.check_eval_settings`).

    The loop calls ``hook(step, ema_model, resolved_config)`` on every rank: each rank
    generates its share of the samples, rank 0 scores them (:func:`make_scorer`; references
    cached in ``RUN_DIR/eval/``) and returns the metrics; the other ranks return ``{}``.
    Creating the hook checks its settings and loads and writes nothing, so a bad one fails
    before training starts.

    Args:
        config: the run config (eval.* and sample.* settings).
        info: rank layout (default: a single process).
        progress: show a sampling progress bar on rank 0.
        inception_weights: pytorch-fid weights file, needed when eval.feature_net=inception.
        vae: the VAE folder of a latent run's FID when ``eval.vae`` is unset (the CLI passes
            ``$TREAD_VAE``).

    Returns:
        The hook.

    Raises:
        ConfigError / DataError: a bad setting (see
            :func:`tread.train.latent_eval.check_eval_settings`).
    """
    from ..eval import finite_metrics

    info = info or DistInfo()
    score = make_scorer(
        config, info, progress=progress, inception_weights=inception_weights, vae=vae
    )

    def hook(step: int, model: nn.Module, resolved: Config) -> dict[str, float]:
        was_training = model.training
        result = score(model, resolved)
        model.train(was_training)
        if not info.is_main:
            return {}
        clean, problems = finite_metrics(result)
        for message in problems:
            logger.warning("step %d evaluation: %s; not logged", step, message)
        # metrics.jsonl must stay valid JSON: non-finite values are left out, not written as NaN.
        return {k: v for k, v in clean.items() if k != "num_samples" and v is not None}

    return hook
