"""Turn a :class:`Config` into the objects of a run: data, model, objective."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from ..data import ImageArrays, load_dataset
from ..errors import ConfigError
from ..models import RoutableBackbone, build_model
from ..seeding import derive_seed
from ..transport import build_objective


def load_data(config: Config, split: str | None = None) -> ImageArrays:
    """Load the configured dataset (``split`` overrides ``data.split``)."""
    data = config.data
    options = {}
    if data.pad_to is not None:
        options["pad_to"] = data.pad_to
    if data.name == "latents":
        options["scale_factor"] = data.latent_scale
    return load_dataset(
        data.name,
        path=data.path,
        split=split or data.split,
        resolution=data.resolution,
        **options,
    )


# Datasets whose class count is inferred from the largest label in the files: a model may
# declare more classes (e.g. an ImageNet subset keeping the 1000-class label ids). Every other
# dataset has a fixed class list, and the model must have exactly that many classes.
_INFERRED_CLASSES = ("idx", "npz", "latents")


def check_num_classes(config: Config, data: ImageArrays) -> int:
    """The model's number of classes for ``data``: ``model.num_classes`` or the data's.

    Label ``num_classes`` is the null label of classifier-free guidance, so a smaller value
    would turn real labels into "no class".

    Raises:
        ConfigError: ``model.num_classes`` does not fit the data's labels.
    """
    wanted, found = config.model.num_classes, data.num_classes
    if wanted is None or wanted == found:
        return found
    where = f"data {data.name}" + (f" ({config.data.path})" if config.data.path else "")
    if wanted < found:
        raise ConfigError(
            f"model.num_classes={wanted} but {where} has labels up to {found - 1}: labels "
            f">= {wanted} would be read as the null (unconditional) label; set it to {found} "
            "or leave it unset"
        )
    if data.name not in _INFERRED_CLASSES:
        raise ConfigError(
            f"model.num_classes={wanted} but {where} has exactly {found} classes; samples and "
            f"evaluations would ask for classes it lacks; set it to {found} or leave it unset"
        )
    return wanted


def with_data_shape(config: Config, data: ImageArrays) -> Config:
    """Fill the model's input size, channels and classes from the data where the config has None,
    and the architecture fields from the registry, then check the model can be built.

    Raises:
        ConfigError: the config sets a value the data contradicts.
    """
    channels, height, width = data.shape
    if height != width:
        raise ConfigError(f"data {data.name}: images must be square, got {height}x{width}")
    model = config.model
    for key, value in (("input_size", height), ("in_channels", channels)):
        current = getattr(model, key)
        if current is not None and current != value:
            raise ConfigError(f"model.{key}={current} but data {data.name} has {value}")
    # dataclasses.replace runs ModelConfig's checks again, now with the input size known
    # (input_size divisible by patch_size).
    model = dataclasses.replace(
        model.with_architecture(),
        input_size=height,
        in_channels=channels,
        num_classes=check_num_classes(config, data),
    )
    return dataclasses.replace(config, model=model)


def build_from_config(config: Config) -> RoutableBackbone:
    """The backbone with the configured routes, initialised from ``train.seed``.

    ``train.activation_checkpointing`` sets the model's ``activation_checkpointing`` (a
    training-memory option: it acts only when grad is enabled and is not in the state_dict).
    Shapes must be resolved (see :func:`with_data_shape`).
    """
    model = config.model
    missing = [k for k in ("input_size", "in_channels", "num_classes") if getattr(model, k) is None]
    if missing:
        raise ConfigError(f"model.{missing[0]} is unset (resolve it from the data first)")
    try:
        backbone = build_model(
            model.name,
            routes=config.routes(),
            keep_order=model.keep_order,
            fp32_after_reinsert=model.fp32_after_reinsert,
            generator=torch.Generator().manual_seed(derive_seed(config.train.seed, "init")),
            **model.overrides(),
        )
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    backbone.activation_checkpointing = config.train.activation_checkpointing
    return backbone


def objective_from_config(config: Config):
    """The configured diffusion objective (EDM or flow matching)."""
    objective = config.objective
    if objective.name == "edm":
        return build_objective(
            "edm",
            p_mean=objective.p_mean,
            p_std=objective.p_std,
            sigma_data=objective.sigma_data,
        )
    return build_objective(
        "flow",
        time_sampling=objective.time_sampling,
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
    )


def prepare_run(config: Config) -> tuple[Config, ImageArrays]:
    """Every check a run needs before it writes anything: (resolved config, dataset).

    Loads the dataset, fills what the config leaves to the data (input size, channels,
    classes) and to the registry (depth, width, heads, patch size, MLP ratio), and checks
    that the model fits the data. The resolved config is what ``--dry-run`` prints and the
    run saves. The run directory must be creatable and writable. (The in-loop evaluation's
    settings are checked when its hook is created.)

    Raises:
        ConfigError / DataError: the first problem found, naming the key, file or value.
    """
    from .rundir import check_writable  # local: rundir is a training-loop module

    check_writable(Path(config.train.run_dir))  # a run_dir under a file fails here, not later
    data = load_data(config)
    resolved = with_data_shape(config, data)
    if resolved.model.num_classes != data.num_classes:
        # A declared superset of an inferred label set: the data agrees with the model.
        data = dataclasses.replace(data, num_classes=resolved.model.num_classes)
    return resolved, data


def resolve_run(config: Config) -> Config:
    """The resolved config after every check of :func:`prepare_run` (what ``--dry-run`` prints)."""
    return prepare_run(config)[0]
