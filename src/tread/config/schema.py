"""Typed run configuration: the dataclasses and every check on their values.

The dataclasses are the single source of truth. A preset is a YAML file whose keys mirror the
dataclasses; it may name another preset in ``base:`` and then lists only what differs. Command
line overrides are ``dotted.key=value`` (YAML-typed values, list indices allowed:
``model.routes.0.ratio=0.25``; ``model.routes.1.start=5`` appends a route). Unknown keys, bad
values and sections that contradict each other (a flow objective with an EDM sampler, a route
past the last block) raise :class:`ConfigError` naming them, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from omegaconf import MISSING

from ..errors import ConfigError
from ..routing import Route
from ..routing.schedule import RATIO_SCHEDULES, scheduled_ratio
from ..transport.flow import TimeSampling
from ..transport.types import ObjectiveName

if TYPE_CHECKING:
    from ..sampling import SparseGuidance

# Closed vocabularies. OmegaConf structured configs cannot hold Literal fields, so the fields
# stay ``str`` and are checked against ``get_args`` of the one Literal that defines each set.
Precision = Literal["auto", "fp32", "bf16"]
TrainDevice = Literal["auto", "cpu", "cuda"]
ReferenceSplit = Literal["train", "test"]  # eval.reference_split: these, or a stats/ADM .npz

OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(TrainDevice)

# Keys that only one objective reads. The other objective's keys are reset to their defaults
# and left out of the saved config, so an EDM run shows no flow-matching settings (and vice
# versa) and two configs that train identically compare equal.
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "edm": ("p_mean", "p_std", "sigma_data"),
    "flow": ("time_sampling", "logit_mean", "logit_std"),
}

# The architecture fields a registry entry provides when the config leaves them None.
ARCH_KEYS = ("depth", "width", "heads", "patch_size", "mlp_ratio")


def _choice(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(section: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}={value!r} must be {bound}")


def _finite(section: str, key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{section}.{key}={value!r} must be a finite number")


def _at_least_one(section: str, key: str, value: int | None) -> None:
    """None (= automatic / from the data) or an integer >= 1."""
    if value is not None and value < 1:
        raise ConfigError(f"{section}.{key}={value!r} must be >= 1 (or null)")


@dataclass
class RouteConfig:
    """One route: blocks start..end (inclusive, negative = from the end) skipped by ``ratio``."""

    start: int = 2
    end: int = -4
    ratio: float = 0.5  # skip ratio (the schedule's value at step 0)
    # Ratio schedule over training steps: "constant" keeps ``ratio``; "linear" / "cosine" go
    # from ``ratio`` at step 0 to ``ratio_final`` at ``schedule_steps`` (None = train.steps)
    # and stay there. Each step uses one ratio for the whole batch (static shapes). The model
    # is built with ``ratio``, and what reads ``to_route`` (the cost model's ideal speed-up in
    # ``tread compare`` / bench, the route in config.yaml's header line) sees the step-0 ratio.
    # None as schedule_steps is fixed to train.steps when a run starts (kept on resume).
    schedule: str = "constant"
    ratio_final: float | None = None
    schedule_steps: int | None = None

    def to_route(self, index: int | None = None) -> Route:
        """The route at step 0 (``ratio``): what the model is built with and the cost model uses."""
        where = "model.routes" if index is None else f"model.routes.{index}"
        try:
            return Route(self.start, self.end, self.ratio)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    def horizon(self, total_steps: int) -> int:
        """S, the step at which the schedule reaches ``ratio_final`` (``schedule_steps`` or the
        run's ``total_steps``)."""
        return total_steps if self.schedule_steps is None else self.schedule_steps

    def ratio_at(self, step: int, total_steps: int) -> float:
        """The skip ratio of training step ``step`` (0-based); see :func:`scheduled_ratio`.

        Args:
            step: the training step (updates done before it).
            total_steps: the horizon when ``schedule_steps`` is None (the run's train.steps).
        """
        return scheduled_ratio(
            self.schedule, self.ratio, self.ratio_final, step, self.horizon(total_steps)
        )

    def check_schedule(self, index: int) -> None:
        """The schedule's own fields: vocabulary, ``ratio_final`` where (and only where) needed.

        Raises:
            ConfigError: one line naming ``model.routes.<index>.<key>`` and the value.
        """
        where = f"model.routes.{index}"
        _choice(where, "schedule", self.schedule, RATIO_SCHEDULES)
        _at_least_one(where, "schedule_steps", self.schedule_steps)
        final = self.ratio_final
        if self.schedule == "constant":
            for key in ("ratio_final", "schedule_steps"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"{where}.{key}={getattr(self, key)!r} needs {where}.schedule=linear "
                        "or cosine (a constant schedule keeps ratio)"
                    )
            return
        if final is None:
            raise ConfigError(
                f"{where}.schedule={self.schedule!r} needs {where}.ratio_final (the skip ratio "
                "at the end of the schedule)"
            )
        if isinstance(final, bool) or not (math.isfinite(final) and 0 <= final < 1):
            raise ConfigError(f"{where}.ratio_final={final!r} must be in [0, 1)")


def _check_routes(routes: Sequence[RouteConfig], depth: int, model: str) -> None:
    """Each route within ``depth`` blocks, start before end, routes in order without overlap.

    Checked against the real depth (the registry's unless ``model.depth`` is set) so a route
    past the last block fails at load, not after the run directory is written.
    """
    previous: tuple[int, int] | None = None
    for index, config in enumerate(routes):
        route = config.to_route(index)
        config.check_schedule(index)
        for key in ("start", "end"):
            value = getattr(route, key)
            if not -depth <= value < depth:
                raise ConfigError(
                    f"model.routes.{index}.{key}={value} is out of range for {model} "
                    f"with model.depth={depth} blocks (valid: {-depth}..{depth - 1})"
                )
        start, end = route.start % depth, route.end % depth  # negative = from the end
        if start > end:
            raise ConfigError(
                f"model.routes.{index}: start={route.start} comes after end={route.end} "
                f"(blocks {start} > {end} with model.depth={depth})"
            )
        if previous is not None and start <= previous[1]:
            raise ConfigError(
                f"model.routes.{index} (blocks {start}..{end}) overlaps or precedes "
                f"model.routes.{index - 1} (blocks {previous[0]}..{previous[1]}); routes must "
                "be in block order and must not overlap"
            )
        previous = (start, end)


@dataclass
class ModelConfig:
    """Backbone: a registry name plus optional architecture overrides."""

    name: str = "DiT-S/2"
    # Input shape and classes: None = taken from the dataset (filled in the saved config).
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    # Architecture: None = the registry entry's value (filled in the saved config).
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
        from ..models import MODEL_CONFIGS

        _choice("model", "name", self.name, list(MODEL_CONFIGS))
        for key in ("input_size", "in_channels", "num_classes", *ARCH_KEYS[:-1]):
            _at_least_one("model", key, getattr(self, key))
        if self.mlp_ratio is not None:
            _positive("model", "mlp_ratio", self.mlp_ratio)
        arch = self.architecture()
        if arch["width"] % arch["heads"]:
            raise ConfigError(
                f"model.width={arch['width']} is not divisible by model.heads={arch['heads']}"
            )
        if arch["width"] % 4:  # the 2-D sin-cos position embedding splits width in 4
            raise ConfigError(f"model.width={arch['width']} must be divisible by 4")
        if self.input_size is not None and self.input_size % arch["patch_size"]:
            raise ConfigError(
                f"model.input_size={self.input_size} is not divisible by "
                f"model.patch_size={arch['patch_size']}"
            )
        _check_routes(self.routes, arch["depth"], self.name)

    def architecture(self) -> dict[str, Any]:
        """depth, width, heads, patch_size, mlp_ratio: the config's values, else the registry's."""
        from ..models import MODEL_CONFIGS

        entry = MODEL_CONFIGS[self.name]
        return {
            key: getattr(entry, key) if getattr(self, key) is None else getattr(self, key)
            for key in ARCH_KEYS
        }

    def with_architecture(self) -> ModelConfig:
        """This config with every architecture field filled in (the registry's where None)."""
        return dataclasses.replace(self, **self.architecture())

    def overrides(self) -> dict[str, Any]:
        """Architecture fields set in the config (the rest come from the registry)."""
        keys = ("input_size", "in_channels", "num_classes", *ARCH_KEYS)
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
        from ..data import DATASET_NAMES, SPLITS

        _choice("data", "name", self.name, DATASET_NAMES)
        _choice("data", "split", self.split, SPLITS)
        _at_least_one("data", "resolution", self.resolution)
        _at_least_one("data", "pad_to", self.pad_to)
        _positive("data", "latent_scale", self.latent_scale)


@dataclass
class ObjectiveConfig:
    """Diffusion objective: EDM (official TREAD recipe) or linear flow matching (SiT)."""

    name: str = "edm"
    p_mean: float = -1.2  # edm only
    p_std: float = 1.2  # edm only
    sigma_data: float = 0.5  # edm only
    time_sampling: str = "logit_normal"  # flow only
    logit_mean: float = 0.0  # flow only
    logit_std: float = 1.0  # flow only

    def __post_init__(self) -> None:
        _choice("objective", "name", self.name, OBJECTIVES)
        _choice("objective", "time_sampling", self.time_sampling, TIME_SAMPLINGS)
        _finite("objective", "p_mean", self.p_mean)
        _finite("objective", "logit_mean", self.logit_mean)
        for key in ("p_std", "sigma_data", "logit_std"):
            _positive("objective", key, getattr(self, key))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in inactive_objective_keys(self.name):
            setattr(self, key, defaults[key])


def inactive_objective_keys(name: str) -> tuple[str, ...]:
    """The objective keys that objective ``name`` does not read."""
    return tuple(k for other, keys in OBJECTIVE_KEYS.items() if other != name for k in keys)


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
        _positive("optim", "eps", self.eps)
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
    guidance: float = 1.0  # the guidance weight: CFG scale s, or SG's omega; 1 = off
    guidance_interval: list[float] | None = None  # [lo, hi] in the sampler's time variable
    # "cfg": uncond + s (cond - uncond). "sg" (sparse guidance): omega D(c; strong) +
    # (1 - omega) D(c; weak), the weak branch routed at a higher skip ratio. "cfg+sg": the weak
    # branch is also unconditional.
    guidance_mode: str = "cfg"
    sg_strong_ratio: float = 0.0  # skip ratio of the strong branch (0 = dense)
    sg_weak_ratio: float | None = None  # skip ratio of the weak branch; None = training ratio
    sg_route: list[int] | None = None  # [start, end] of the sparse branches; None = training's
    seed: int = 0
    grid_size: int = 100  # images in each periodic grid (labels cycle through the classes)

    def __post_init__(self) -> None:
        from ..sampling import SAMPLERS

        _choice("sample", "sampler", self.sampler, list(SAMPLERS))
        _positive("sample", "steps", self.steps)
        _positive("sample", "guidance", self.guidance, allow_zero=True)
        _positive("sample", "grid_size", self.grid_size)
        interval = self.guidance_interval
        if interval is not None and (
            len(interval) != 2
            or not all(math.isfinite(v) and v >= 0 for v in interval)
            or interval[0] > interval[1]
        ):
            raise ConfigError(
                f"sample.guidance_interval={list(interval)!r} (--guidance-interval) needs "
                "[lo, hi] with 0 <= lo <= hi"
            )
        self._check_sparse_guidance()

    def _check_sparse_guidance(self) -> None:
        """The SG fields on their own (the route and the training ratio: ``sparse_guidance``)."""
        from ..sampling import GUIDANCE_MODES

        _choice("sample", "guidance_mode", self.guidance_mode, GUIDANCE_MODES)
        for key, flag in (("sg_strong_ratio", "--sg-strong"), ("sg_weak_ratio", "--sg-weak")):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"sample.{key}={value!r} ({flag}) must be in [0, 1)")
        weak = self.sg_weak_ratio
        if weak is not None and not self.sg_strong_ratio < weak:
            raise ConfigError(
                f"sample.sg_strong_ratio={self.sg_strong_ratio!r} (--sg-strong) must be below "
                f"sample.sg_weak_ratio={weak!r} (--sg-weak): the weak branch skips more tokens"
            )
        route = self.sg_route
        if route is not None:
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in route)
            if len(route) != 2 or not ints:
                raise ConfigError(
                    f"sample.sg_route={list(route)!r} (--sg-route) needs [start, end] block indices"
                )
            start, end = route
            if (start >= 0) == (end >= 0) and start > end:
                raise ConfigError(
                    f"sample.sg_route={list(route)!r} (--sg-route): start {start} comes after "
                    f"end {end}"
                )

    def sparse_guidance(self, training: Sequence[Route], depth: int) -> SparseGuidance | None:
        """The sparse-guidance branches this config asks for, with defaults from training.

        Args:
            training: the run's training routes (the default spans; their common ratio is the
                default weak ratio).
            depth: the model's number of blocks (``sg_route`` is checked against it).

        Returns:
            The branches' ratios and spans (block indices resolved), or None in mode "cfg".

        Raises:
            ConfigError: one line naming the key (and its CLI flag) and value.
        """
        from ..sampling import SparseGuidance

        if self.guidance_mode == "cfg":
            return None
        mode = f"sample.guidance_mode={self.guidance_mode!r}"
        if self.sg_route is not None:
            start, end = self.sg_route
            try:
                Route(start, end).resolve(depth)
            except ValueError:
                raise ConfigError(
                    f"sample.sg_route={list(self.sg_route)!r} (--sg-route) is outside the "
                    f"model's {depth} blocks (valid: {-depth}..{depth - 1}, start before end)"
                ) from None
            spans = ((start, end),)
        elif training:
            spans = tuple((r.start, r.end) for r in training)
        else:
            raise ConfigError(
                f"{mode} needs a route for its sparse branch, and this model was trained "
                "without one: set sample.sg_route=[start, end] (--sg-route START,END)"
            )
        weak = self.sg_weak_ratio
        if weak is None:
            ratios = sorted({r.ratio for r in training})
            if len(ratios) != 1:
                what = "without routes" if not ratios else f"with ratios {ratios}"
                raise ConfigError(
                    f"{mode} takes its weak ratio from the training route, but the model was "
                    f"trained {what}: set sample.sg_weak_ratio (--sg-weak)"
                )
            weak = ratios[0]
        if not self.sg_strong_ratio < weak:
            raise ConfigError(
                f"sample.sg_strong_ratio={self.sg_strong_ratio!r} (--sg-strong) must be below "
                f"the weak ratio {weak!r} (sample.sg_weak_ratio / --sg-weak, default: the "
                "training ratio)"
            )
        # Spans with non-negative block indices, so records and printouts name real blocks.
        resolved = tuple((start % depth, end % depth) for start, end in spans)
        return SparseGuidance(self.sg_strong_ratio, float(weak), resolved)


@dataclass
class EvalConfig:
    """Periodic evaluation during training (FD + conditional accuracy with a packaged net)."""

    every: int = 0  # steps; 0 = off
    num_samples: int = 1000
    feature_net: str | None = None  # None = the dataset's packaged classifier
    reference_split: str = "test"  # train | test | a stats .npz or an ADM reference batch .npz

    def __post_init__(self) -> None:
        _positive("eval", "every", self.every, allow_zero=True)
        _positive("eval", "num_samples", self.num_samples)
        if self.reference_split not in get_args(ReferenceSplit) and not str(
            self.reference_split
        ).endswith(".npz"):
            choices = " | ".join(get_args(ReferenceSplit))
            raise ConfigError(
                f"eval.reference_split={self.reference_split!r} is not one of {choices} "
                "or a path to a .npz (feature statistics or an ADM reference batch)"
            )
        if self.feature_net is not None:
            _choice("eval", "feature_net", self.feature_net, feature_net_names())


def feature_net_names() -> tuple[str, ...]:
    """Feature networks the evaluation knows: the packaged classifiers, then Inception-v3."""
    from ..eval.classifiers import ClassifierName  # local: the eval package is heavy

    return (*get_args(ClassifierName), "inception")


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
    num_threads: int | None = None  # CPU threads (None = automatic: the free cores)
    # How long ranks wait for each other in a collective (e.g. while rank 0 scores an
    # evaluation) before torch.distributed gives up: generous, a hang still ends.
    dist_timeout_minutes: float = 60.0
    # Dense fine-tune phase (the paper's "(F)"): from this step on, routing is off and the
    # learning rate is ``finetune_lr`` (None = keep optim.lr). None = no such phase.
    finetune_from: int | None = None
    finetune_lr: float | None = None

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ConfigError("train.run_dir must not be empty")
        _positive("train", "seed", self.seed, allow_zero=True)
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
        _at_least_one("train", "num_threads", self.num_threads)
        _positive("train", "dist_timeout_minutes", self.dist_timeout_minutes)
        self._check_finetune()

    def _check_finetune(self) -> None:
        """``finetune_from`` in 1..steps (== steps: the phase starts where this run ends, for a
        resume with more steps); ``finetune_lr`` > 0 and only with ``finetune_from``."""
        start, lr = self.finetune_from, self.finetune_lr
        if lr is not None:
            _positive("train", "finetune_lr", lr)
            if start is None:
                raise ConfigError(
                    f"train.finetune_lr={lr!r} needs train.finetune_from (the step at which the "
                    "dense fine-tune phase starts)"
                )
        if start is None:
            return
        _at_least_one("train", "finetune_from", start)
        if start > self.steps:
            raise ConfigError(
                f"train.finetune_from={start} is past train.steps={self.steps}: the dense "
                "fine-tune phase would never start"
            )

    def in_finetune(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) belongs to the dense fine-tune phase."""
        return self.finetune_from is not None and step >= self.finetune_from


def _final_ratio(route: RouteConfig) -> float:
    """The skip ratio a route trains with at the end: ``ratio_final`` under a schedule."""
    scheduled = getattr(route, "schedule", "constant") != "constant"
    final = getattr(route, "ratio_final", None)
    return float(final) if scheduled and final is not None else float(route.ratio)


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

    def __post_init__(self) -> None:
        # Checks across sections; each section has checked its own values already.
        from ..sampling import SAMPLERS

        needs = SAMPLERS[self.sample.sampler].objective
        if needs != self.objective.name:
            fits = ", ".join(k for k, s in SAMPLERS.items() if s.objective == self.objective.name)
            raise ConfigError(
                f"sample.sampler={self.sample.sampler!r} integrates an {needs!r} model but "
                f"objective.name={self.objective.name!r}; use one of: {fits}"
            )
        tc = self.train
        if tc.finetune_from is not None and not self.model.routes and tc.finetune_lr is None:
            raise ConfigError(
                f"train.finetune_from={tc.finetune_from} does nothing: model.routes is empty "
                "(nothing to switch off) and train.finetune_lr is unset"
            )
        self.sparse_guidance()  # sg / cfg+sg: a route to run and a weak ratio above the strong

    def sparse_guidance(self) -> SparseGuidance | None:
        """The sparse-guidance branches of ``sample`` (None in mode "cfg"), see
        :meth:`SampleConfig.sparse_guidance`; the default weak ratio is the one a route trains
        with at the end of its schedule."""
        training = [
            Route(r.start, r.end, _final_ratio(r)) for r in self.model.routes
        ]  # validated by ModelConfig already
        return self.sample.sparse_guidance(training, self.depth())

    def routes(self) -> list[Route]:
        return [r.to_route(i) for i, r in enumerate(self.model.routes)]

    def depth(self) -> int:
        """Number of blocks: ``model.depth`` or the registry entry's."""
        return int(self.model.architecture()["depth"])
