"""Typed run configuration: dataclasses, YAML presets with ``base:`` inheritance, dotted overrides.

The dataclasses are the single source of truth. A preset is a YAML file whose keys mirror the
dataclasses; it may name another preset in ``base:`` and then lists only what differs. Command
line overrides are ``dotted.key=value`` (YAML-typed values, list indices allowed:
``model.routes.0.ratio=0.25``). Unknown keys and bad values raise :class:`ConfigError` naming
them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .routing import Route

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "digits_tread"

OBJECTIVES = ("edm", "flow")
TIME_SAMPLINGS = ("uniform", "logit_normal")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def _choice(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(section: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}={value!r} must be {bound}")


@dataclass
class RouteConfig:
    """One route: blocks start..end (inclusive, negative = from the end) skipped by ``ratio``."""

    start: int = 2
    end: int = -4
    ratio: float = 0.5

    def to_route(self) -> Route:
        try:
            return Route(self.start, self.end, self.ratio)
        except ValueError as err:
            raise ConfigError(f"model.routes: {err}") from None


@dataclass
class ModelConfig:
    """Backbone: a registry name plus optional architecture overrides."""

    name: str = "DiT-S/2"
    # Input shape and classes: None = taken from the dataset (filled in the saved config).
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    learn_sigma: bool = False
    routes: list[RouteConfig] = field(default_factory=list)
    keep_order: bool = False
    fp32_after_reinsert: bool = False

    def __post_init__(self) -> None:
        from .models import MODEL_CONFIGS

        _choice("model", "name", self.name, list(MODEL_CONFIGS))
        for key in ("input_size", "in_channels", "depth", "width", "heads", "patch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"model.{key}={value!r} must be >= 1")

    def overrides(self) -> dict[str, Any]:
        """Architecture fields set in the config (the rest come from the registry)."""
        keys = ("input_size", "in_channels", "num_classes", "depth", "width", "heads")
        keys += ("patch_size", "mlp_ratio")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["learn_sigma"] = self.learn_sigma
        return out


@dataclass
class DataConfig:
    """Training data; nothing is downloaded."""

    name: str = "digits"
    path: str | None = None
    split: str = "train"
    resolution: int | None = None  # folder/npz images: resize + centre crop to this side
    pad_to: int | None = None  # IDX (28x28) images: pad to this side (e.g. 32)
    hflip: bool = False
    latent_scale: float = 1.0  # multiply precomputed latents by this (SD-VAE: 0.18215)

    def __post_init__(self) -> None:
        from .data import DATASET_NAMES

        _choice("data", "name", self.name, DATASET_NAMES)
        _choice("data", "split", self.split, ("train", "test", "all"))


@dataclass
class ObjectiveConfig:
    """Diffusion objective: EDM (official TREAD recipe) or linear flow matching (SiT)."""

    name: str = "edm"
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    time_sampling: str = "logit_normal"  # flow only
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        _choice("objective", "name", self.name, OBJECTIVES)
        _choice("objective", "time_sampling", self.time_sampling, TIME_SAMPLINGS)


@dataclass
class OptimConfig:
    """AdamW with the paper's defaults."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None = no clipping (paper)
    warmup_steps: int = 0  # linear lr warm-up

    def __post_init__(self) -> None:
        _positive("optim", "lr", self.lr)
        _positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1)")
        if self.grad_clip is not None:
            _positive("optim", "grad_clip", self.grad_clip)
        _positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)


@dataclass
class EMAConfig:
    """Exponential moving average of the weights."""

    decay: float = 0.9999
    # Warm-up: the effective decay is min(decay, (1 + step) / (10 + step)), so short runs get a
    # useful average instead of one dominated by the random initialisation.
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError(f"ema.decay={self.decay!r} must be in [0, 1)")


@dataclass
class SampleConfig:
    """Sampling settings for periodic grids, evaluation and ``tread sample`` defaults."""

    sampler: str = "edm_heun"
    steps: int = 18
    guidance: float = 1.0
    guidance_interval: list[float] | None = None  # [lo, hi] in the sampler's time variable
    seed: int = 0
    grid_size: int = 100  # images in each periodic grid (labels cycle through the classes)

    def __post_init__(self) -> None:
        from .sampling import SAMPLERS

        _choice("sample", "sampler", self.sampler, list(SAMPLERS))
        _positive("sample", "steps", self.steps)
        _positive("sample", "guidance", self.guidance, allow_zero=True)
        if self.guidance_interval is not None and len(self.guidance_interval) != 2:
            raise ConfigError(f"sample.guidance_interval={self.guidance_interval!r} needs [lo, hi]")


@dataclass
class EvalConfig:
    """Periodic evaluation during training (FD + conditional accuracy with a packaged net)."""

    every: int = 0  # steps; 0 = off
    num_samples: int = 1000
    feature_net: str | None = None  # None = the dataset's packaged classifier
    reference_split: str = "test"


@dataclass
class TrainConfig:
    """Loop settings."""

    run_dir: str = "runs/digits_tread"
    seed: int = 0
    batch_size: int = 64  # global batch (split across ranks)
    steps: int = 4000
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall-clock
    class_dropout: float = 0.1
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    tf32: bool = True
    device: str = "auto"
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 2
    sample_every: int = 1000
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    tensorboard: bool = False
    num_threads: int | None = None  # CPU threads (None = torch default)

    def __post_init__(self) -> None:
        for key in ("batch_size", "steps", "log_every", "keep_last"):
            _positive("train", key, getattr(self, key))
        for key in ("ckpt_every", "sample_every"):
            _positive("train", key, getattr(self, key), allow_zero=True)
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"train.class_dropout={self.class_dropout!r} must be in [0, 1)")
        _choice("train", "precision", self.precision, PRECISIONS)
        _choice("train", "device", self.device, DEVICES)
        if self.max_minutes is not None:
            _positive("train", "max_minutes", self.max_minutes)


@dataclass
class Config:
    """Everything a run needs; saved resolved in the run directory and in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = MISSING

    def routes(self) -> list[Route]:
        return [r.to_route() for r in self.model.routes]


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
    except (OSError, yaml.YAMLError) as err:
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


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from a preset (default: digits + TREAD) and overrides.

    Args:
        preset: preset name or YAML path; None = :data:`DEFAULT_PRESET`.
        overrides: ``dotted.key=value`` strings, applied in order.

    Raises:
        ConfigError: unknown key, bad type or value, unreadable file; the message names it.
    """
    path = preset_path(preset or DEFAULT_PRESET)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(_read_yaml(path)))
    except OmegaConfBaseException as err:
        raise _wrap(err, f"config {path}") from None
    cfg.preset = str(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        try:
            OmegaConf.select(cfg, key, throw_on_missing=False)
            if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
                parent, _, _ = key.rpartition(".")
                # Allow new list items (model.routes.1.start) only under an existing list.
                if not parent or not OmegaConf.is_list(OmegaConf.select(cfg, parent)):
                    raise ConfigError(f"override {item!r}: unknown key {key!r}")
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
    return to_object(cfg)


def to_object(cfg: Any) -> Config:
    """Instantiate the dataclasses (running their validation) from an OmegaConf node."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _wrap(err, "config") from None
    for route in obj.model.routes:
        route.to_route()
    return obj


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain dict of a config (for JSON/YAML)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated config from :func:`config_to_dict` output (e.g. from a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _wrap(err, "saved config") from None
    return to_object(cfg)
