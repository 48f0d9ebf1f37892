"""Turn a :class:`Config` into the objects of a run: data, model, objective."""

from __future__ import annotations

import dataclasses

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


def with_data_shape(config: Config, data: ImageArrays) -> Config:
    """Fill the model's input size, channels and classes from the data where the config has None.

    Raises:
        ConfigError: the config sets a value the data contradicts.
    """
    channels, height, width = data.shape
    if height != width:
        raise ConfigError(f"data {data.name}: images must be square, got {height}x{width}")
    found = {"input_size": height, "in_channels": channels, "num_classes": data.num_classes}
    model = config.model
    updates = {}
    for key, value in found.items():
        current = getattr(model, key)
        if current is None:
            updates[key] = value
        elif key != "num_classes" and current != value:
            raise ConfigError(f"model.{key}={current} but data {data.name} has {value}")
    return dataclasses.replace(config, model=dataclasses.replace(model, **updates))


def build_from_config(config: Config) -> RoutableBackbone:
    """The backbone with the configured routes, initialised from ``train.seed``.

    Shapes must be resolved (see :func:`with_data_shape`).
    """
    model = config.model
    missing = [k for k in ("input_size", "in_channels", "num_classes") if getattr(model, k) is None]
    if missing:
        raise ConfigError(f"model.{missing[0]} is unset (resolve it from the data first)")
    try:
        return build_model(
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

    Loads the dataset (shapes, classes) and fills what the config leaves to the data.
    """
    data = load_data(config)
    return with_data_shape(config, data), data


def resolve_run(config: Config) -> Config:
    """The resolved config after every check of :func:`prepare_run` (what ``--dry-run`` prints)."""
    return prepare_run(config)[0]
