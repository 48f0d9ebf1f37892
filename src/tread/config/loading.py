"""Reading and writing run configs: presets with ``base:`` inheritance, dotted overrides, YAML.

A preset is a YAML file whose keys mirror the dataclasses of :mod:`tread.config.schema`; it may
name another preset in ``base:`` and then lists only what differs. Command line overrides are
``dotted.key=value`` (YAML-typed values, list indices allowed: ``model.routes.0.ratio=0.25``;
``model.routes.1.start=5`` appends a route).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..routing import describe_routes
from .model import ARCH_KEYS, RouteConfig
from .schema import Config, inactive_objective_keys

PRESET_DIR = Path(__file__).parent.parent / "configs"
DEFAULT_PRESET = "digits_tread"


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split CLI words into (preset or YAML path, overrides): the first word is a preset unless
    it looks like ``key=value``."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``digits_tread``) or a YAML path to an existing file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {names}")
    return candidate


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, merging it over its ``base:`` preset (resolved relative to the file)."""
    if path.resolve() in chain:
        raise ConfigError(f"config {path}: circular base chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config {path}: cannot read YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base) if str(base).endswith((".yaml", ".yml")) else base
    merged = OmegaConf.merge(
        _read_yaml(preset_path(base_path), (*chain, path.resolve())), OmegaConf.create(raw)
    )
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def _wrap(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if "Key" in type(err).__name__ and key:
        message = f"unknown key {key!r}"
    elif key:
        message = f"{key}: {message}"
    return ConfigError(f"{where}: {message}")


# Lists of structured items that an override may grow by one (``model.routes.1.start=5``).
_GROWABLE_LISTS: dict[str, type] = {"model.routes": RouteConfig}


def _grow_list(cfg: Any, key: str, item: str) -> None:
    """Append a default item when ``key`` indexes one past the end of a growable list."""
    parts = key.split(".")
    for cut in range(1, len(parts)):
        parent, index = ".".join(parts[:cut]), parts[cut]
        if parent not in _GROWABLE_LISTS or not index.isdigit():
            continue
        node = OmegaConf.select(cfg, parent)
        size = len(node)
        if int(index) == size and cut < len(parts) - 1:
            node.append(_GROWABLE_LISTS[parent]())  # unset fields keep their defaults
        elif int(index) > size:
            raise ConfigError(
                f"override {item!r}: {parent} has {size} item(s), so the next one is "
                f"{parent}.{size}; or set the whole list, e.g. "
                f"{parent}=[{{start: 2, end: 4, ratio: 0.5}}]"
            )


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from a preset (default: digits + TREAD) and overrides.

    Args:
        preset: preset name or YAML path; None = :data:`DEFAULT_PRESET`.
        overrides: ``dotted.key=value`` strings, applied in order. An index one past the end
            of ``model.routes`` adds a route with default values for the fields not given.

    Raises:
        ConfigError: unknown key, bad type or value, sections that contradict each other,
            unreadable file; the message names it.
    """
    path = preset_path(preset or DEFAULT_PRESET)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(_read_yaml(path)))
    except OmegaConfBaseException as err:
        raise _wrap(err, f"config {path}") from None
    cfg.preset = str(path)
    keys = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        try:
            _grow_list(cfg, key, item)
            if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
                raise ConfigError(f"override {item!r}: unknown key {key!r}")
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
        keys.append(key)
    # A key the chosen objective never reads is a mistake when the user sets it by hand (in a
    # preset it may be inherited from a base with the other objective, and is dropped).
    unused = inactive_objective_keys(str(cfg.objective.name))
    for key in keys:
        if key.startswith("objective.") and key.partition(".")[2] in unused:
            raise ConfigError(
                f"override {key}: objective.name={cfg.objective.name!r} does not use it "
                f"(it belongs to another objective)"
            )
    return to_object(cfg)


def to_object(cfg: Any) -> Config:
    """Instantiate the dataclasses (running their validation) from an OmegaConf node."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _wrap(err, "config") from None


# Keys that only matter once a feature is switched on; left out of saved configs while it is
# off (loading fills their defaults back in), so a plain run's config.yaml stays short.
_ROUTE_SCHEDULE_KEYS = ("schedule", "ratio_final", "schedule_steps")  # off: schedule constant
_SPARSE_GUIDANCE_KEYS = ("sg_strong_ratio", "sg_weak_ratio", "sg_route")  # off: mode cfg
_FINETUNE_KEYS = ("finetune_from", "finetune_lr")  # off: finetune_from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain dict of a config (for JSON/YAML), without the keys nothing reads: the other
    objective's, and those of features that are off (route schedules, sparse guidance, the
    dense fine-tune phase, ``train.init_from``)."""
    data = dataclasses.asdict(config)
    family_keys = config.model.family_keys()
    for key in ARCH_KEYS:  # keys the backbone family does not have (a Mamba's heads)
        if key not in family_keys:
            data["model"].pop(key)
    for key in inactive_objective_keys(config.objective.name):
        data["objective"].pop(key, None)
    for route in data["model"]["routes"]:
        if route["schedule"] == "constant" and route["ratio_final"] is None:
            for key in _ROUTE_SCHEDULE_KEYS:
                route.pop(key)
    if data["sample"]["guidance_mode"] == "cfg":
        for key in _SPARSE_GUIDANCE_KEYS:
            data["sample"].pop(key)
    if data["train"]["finetune_from"] is None and data["train"]["finetune_lr"] is None:
        for key in _FINETUNE_KEYS:
            data["train"].pop(key)
    if data["train"]["init_from"] is None:  # a run from scratch
        data["train"].pop("init_from")
    return data


def describe_resolved(config: Config) -> str:
    """One line on what the config builds, e.g. ``DiT-S/2 registry entry with depth 8, width
    128, 4 heads; tokens: 64 (8x8, patch 1); routes: r(2→4, 0.5)``.

    The registry name alone would mislead when the config overrides its size (the digits model
    is a DiT-S/2 entry cut to 8 blocks of width 128), so the real size is always spelled out.
    The token count needs ``model.input_size`` (known once the data is loaded).
    """
    arch = config.model.architecture()
    parts = [f"{config.model.name} registry entry with {config.model.describe_architecture()}"]
    if config.model.input_size is not None:
        side = config.model.input_size // arch["patch_size"]
        parts.append(f"tokens: {side * side} ({side}x{side}, patch {arch['patch_size']})")
    parts.append(f"routes: {describe_routes(config.routes(), arch['depth'])}")
    return "; ".join(parts)


def config_to_yaml(config: Config) -> str:
    """The config as YAML, headed by a comment line from :func:`describe_resolved`."""
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    return f"# {describe_resolved(config)}\n{body}"


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated config from :func:`config_to_dict` output (e.g. from a checkpoint).

    Keys left out of a saved config (those its objective does not read) take their defaults.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"saved config must be a mapping, got {type(data).__name__}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _wrap(err, "saved config") from None
    return to_object(cfg)
