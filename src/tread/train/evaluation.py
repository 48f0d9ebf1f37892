"""Sample-quality evaluation of a model: generation + metrics, for training and ``tread eval``.

Generation uses per-sample seeds and class-balanced labels (0, 1, ..., K-1, 0, ...), so a number
is reproducible from the recorded (checkpoint, sampler, steps, guidance, seed, count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .dist import DistInfo

PACKAGED_NETS = ("digits", "fashion_mnist")


def feature_net_for(
    config: Config,
    name: str | None = None,
    *,
    inception_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
):
    """The feature network: a packaged classifier (default: the dataset's) or Inception-v3."""
    from ..eval import load_classifier, load_inception

    name = name or config.eval.feature_net or config.data.name
    if name == "inception":
        return load_inception(inception_weights, device=device)
    if name not in PACKAGED_NETS:
        raise ConfigError(
            f"no packaged feature net for {name!r}; use --feature-net "
            f"{' | '.join((*PACKAGED_NETS, 'inception'))}"
        )
    return load_classifier(name, device=device)


def reference_for(
    config: Config, net: Any, reference: str | None, cache_dir: Path, device: torch.device
):
    """Reference statistics: a dataset split (cached), a stats file, or an ADM batch."""
    from ..eval import adm_reference_stats, load_stats, reference_stats

    reference = reference or config.eval.reference_split
    if reference in ("train", "test"):
        if config.data.name == "latents":
            # The split holds latents, not images: the feature net cannot score them.
            raise ConfigError(
                "a latent model is scored on decoded images: pass --reference with a stats "
                ".npz or an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)"
            )
        cache = cache_dir / f"ref_{config.data.name}_{reference}_{net.name}.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        return reference_stats(
            config.data.name, reference, net, cache, data_path=config.data.path, device=device
        )
    path = Path(reference)
    if not path.is_file():
        raise ConfigError(f"reference {reference!r} is neither 'train'/'test' nor a file")
    with np.load(path) as data:
        is_adm = "arr_0" in data.files
    return adm_reference_stats(path, net, device=device) if is_adm else load_stats(path)


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
    :func:`tread.data.vae.latent_decoder`); None keeps the samples as they are.

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
    )


def default_eval_hook(config: Config, info: DistInfo | None = None):
    """Hook for the training loop: FD + conditional accuracy of the EMA model every K steps."""
    device = torch.device(
        "cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu"
    )
    net = feature_net_for(config, device=device)
    cache_dir = Path(config.train.run_dir) / "eval"
    reference = reference_for(config, net, None, cache_dir, device)

    def hook(step: int, model: nn.Module, resolved: Config) -> dict[str, float]:
        was_training = model.training
        result = evaluate_model(
            model,
            resolved,
            num_samples=config.eval.num_samples,
            metrics=("fd", "acc"),
            net=net,
            reference_stats=reference,
            seed=config.sample.seed,
            device=device,
        )
        model.train(was_training)
        return {k: v for k, v in result.items() if k != "num_samples"}

    return hook
