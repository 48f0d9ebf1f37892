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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from omegaconf import MISSING

from ..errors import ConfigError
from ..routing import Route
from ..transport.flow import TimeSampling
from ..transport.types import ObjectiveName
from .checks import check_at_least_one, check_choice, check_finite, check_positive
from .model import ModelConfig
from .sampling import SampleConfig

if TYPE_CHECKING:
    from ..sampling import SparseGuidance

# Closed vocabularies. OmegaConf structured configs cannot hold Literal fields, so the fields
# stay ``str`` and are checked against ``get_args`` of the one Literal that defines each set.
Precision = Literal["auto", "fp32", "bf16"]
TrainDevice = Literal["auto", "cpu", "cuda"]
# train.parallel: how several processes share the model. ddp: a full replica per rank, gradients
# all-reduced; fsdp: parameters, gradients and optimizer state sharded over the ranks (FSDP2,
# torch.distributed.fsdp.fully_shard). One process runs the plain model either way.
Parallel = Literal["ddp", "fsdp"]
ReferenceSplit = Literal["train", "test"]  # eval.reference_split: these, or a stats/ADM .npz

OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(TrainDevice)
PARALLELS: tuple[str, ...] = get_args(Parallel)

# Keys that only one objective reads. The other objective's keys are reset to their defaults
# and left out of the saved config, so an EDM run shows no flow-matching settings (and vice
# versa) and two configs that train identically compare equal.
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "edm": ("p_mean", "p_std", "sigma_data"),
    "flow": ("time_sampling", "logit_mean", "logit_std"),
}


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

        check_choice("data", "name", self.name, DATASET_NAMES)
        check_choice("data", "split", self.split, SPLITS)
        check_at_least_one("data", "resolution", self.resolution)
        check_at_least_one("data", "pad_to", self.pad_to)
        check_positive("data", "latent_scale", self.latent_scale)


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
        check_choice("objective", "name", self.name, OBJECTIVES)
        check_choice("objective", "time_sampling", self.time_sampling, TIME_SAMPLINGS)
        check_finite("objective", "p_mean", self.p_mean)
        check_finite("objective", "logit_mean", self.logit_mean)
        for key in ("p_std", "sigma_data", "logit_std"):
            check_positive("objective", key, getattr(self, key))
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
        check_positive("optim", "lr", self.lr)
        check_positive("optim", "eps", self.eps)
        check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be in [0, 1)")
        if self.grad_clip is not None:
            check_positive("optim", "grad_clip", self.grad_clip)
        check_positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)


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
class EvalConfig:
    """Periodic evaluation during training.

    Pixel runs: FD + conditional accuracy with a packaged net (or FID with Inception). Latent
    runs (``data.name=latents``): the Fréchet distance of pooled latents to the data's
    ("fd_latent", needs nothing else), or with ``feature_net=inception`` the FID of the
    VAE-decoded samples (needs ``vae``, Inception weights and a reference file).
    """

    every: int = 0  # steps; 0 = off
    num_samples: int = 1000
    # None = the dataset's packaged classifier (pixel runs) or the latent FD (latent runs)
    feature_net: str | None = None
    reference_split: str = "test"  # train | test | a stats .npz or an ADM reference batch .npz
    # Latent runs with feature_net=inception: a local diffusers AutoencoderKL folder that
    # decodes the samples (None = $TREAD_VAE). Only the value is checked here: the folder is
    # checked when the evaluation is set up (and by --dry-run), so a saved config stays loadable.
    vae: str | None = None

    def __post_init__(self) -> None:
        check_positive("eval", "every", self.every, allow_zero=True)
        check_positive("eval", "num_samples", self.num_samples)
        if self.vae is not None and not str(self.vae).strip():
            raise ConfigError("eval.vae must not be empty: a VAE folder, or null ($TREAD_VAE)")
        if self.reference_split not in get_args(ReferenceSplit) and not str(
            self.reference_split
        ).endswith(".npz"):
            choices = " | ".join(get_args(ReferenceSplit))
            raise ConfigError(
                f"eval.reference_split={self.reference_split!r} is not one of {choices} "
                "or a path to a .npz (feature statistics or an ADM reference batch)"
            )
        if self.feature_net is not None:
            check_choice("eval", "feature_net", self.feature_net, feature_net_names())


def feature_net_names() -> tuple[str, ...]:
    """Feature networks the evaluation knows: the packaged classifiers, then Inception-v3."""
    from ..eval.classifiers import ClassifierName  # local: the eval package is heavy

    return (*get_args(ClassifierName), "inception")


@dataclass
class TrainConfig:
    """Loop settings."""

    run_dir: str = "runs/digits_tread"
    seed: int = 0
    batch_size: int = 64  # global batch (split across ranks, then into micro-batches)
    # Micro-batches per optimizer update on each rank (gradient accumulation): each rank
    # runs batch_size / (ranks * grad_accum) samples at a time; the update is the one of
    # the whole global batch at once.
    grad_accum: int = 1
    parallel: str = "ddp"  # ddp | fsdp (see Parallel); ignored by a single process
    # Recompute each block's activations in the backward pass instead of keeping them
    # (torch.utils.checkpoint): less memory, about one more forward of the blocks per step.
    # Routing-aware: a routed block recomputes on the same kept tokens.
    activation_checkpointing: bool = False
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
    # A NEW run (step 0, fresh optimizer, data stream and schedules) whose model and EMA weights
    # come from: a checkpoint directory, a run directory (its newest checkpoint) or one
    # .safetensors file in tread's key layout (model and EMA both). Checked against the model
    # before anything is written; a resume of the run ignores it (the run's own checkpoint wins).
    init_from: str | None = None
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
        check_positive("train", "seed", self.seed, allow_zero=True)
        for key in ("batch_size", "steps", "log_every", "keep_last", "grad_accum"):
            check_positive("train", key, getattr(self, key))
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum} (equal micro-batches)"
            )
        for key in ("ckpt_every", "sample_every"):
            check_positive("train", key, getattr(self, key), allow_zero=True)
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"train.class_dropout={self.class_dropout!r} must be in [0, 1)")
        check_choice("train", "precision", self.precision, PRECISIONS)
        check_choice("train", "device", self.device, DEVICES)
        check_choice("train", "parallel", self.parallel, PARALLELS)
        if self.max_minutes is not None:
            check_positive("train", "max_minutes", self.max_minutes)
        check_at_least_one("train", "num_threads", self.num_threads)
        check_positive("train", "dist_timeout_minutes", self.dist_timeout_minutes)
        # Only the value here: the files are checked when a run starts (and by --dry-run), so
        # a saved config stays loadable after its source of weights is moved or deleted.
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError(
                "train.init_from must not be empty: a checkpoint or run directory, a "
                ".safetensors file, or null"
            )
        self._check_finetune()

    def _check_finetune(self) -> None:
        """``finetune_from`` in 1..steps (== steps: the phase starts where this run ends, for a
        resume with more steps); ``finetune_lr`` > 0 and only with ``finetune_from``."""
        start, lr = self.finetune_from, self.finetune_lr
        if lr is not None:
            check_positive("train", "finetune_lr", lr)
            if start is None:
                raise ConfigError(
                    f"train.finetune_lr={lr!r} needs train.finetune_from (the step at which the "
                    "dense fine-tune phase starts)"
                )
        if start is None:
            return
        check_at_least_one("train", "finetune_from", start)
        if start > self.steps:
            raise ConfigError(
                f"train.finetune_from={start} is past train.steps={self.steps}: the dense "
                "fine-tune phase would never start"
            )

    def in_finetune(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) belongs to the dense fine-tune phase."""
        return self.finetune_from is not None and step >= self.finetune_from


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
            Route(r.start, r.end, r.final_ratio()) for r in self.model.routes
        ]  # validated by ModelConfig already
        return self.sample.sparse_guidance(training, self.depth())

    def routes(self) -> list[Route]:
        return [r.to_route(i) for i, r in enumerate(self.model.routes)]

    def depth(self) -> int:
        """Number of blocks: ``model.depth`` or the registry entry's."""
        return int(self.model.architecture()["depth"])
