"""The ``model:`` section: backbone name, architecture overrides and routes (with schedules)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..routing import Route
from ..routing.schedule import RATIO_SCHEDULES, scheduled_ratio
from .checks import check_at_least_one, check_choice, check_positive

# The architecture fields a registry entry provides when the config leaves them None. Each
# family has its own subset (a Mamba has no heads, a DiT no d_state): see ModelConfig.
ARCH_KEYS = ("depth", "width", "heads", "patch_size", "mlp_ratio", "d_state", "expand", "scan")
# The input fields every family has; None = from the dataset.
_SHAPE_KEYS = ("input_size", "in_channels", "num_classes")


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

    def final_ratio(self) -> float:
        """The skip ratio the route trains with at the end: ``ratio_final`` under a schedule."""
        if self.schedule != "constant" and self.ratio_final is not None:
            return float(self.ratio_final)
        return float(self.ratio)

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
        check_choice(where, "schedule", self.schedule, RATIO_SCHEDULES)
        check_at_least_one(where, "schedule_steps", self.schedule_steps)
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
    """Backbone: a registry name plus optional architecture overrides.

    Architecture keys left None take the registry entry's value. A key the entry's family does
    not have (``heads`` on a Mamba, ``d_state`` on a DiT) must stay None.
    """

    name: str = "DiT-S/2"
    # Input shape and classes: None = taken from the dataset (filled in the saved config).
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    # Architecture: None = the registry entry's value (filled in the saved config).
    depth: int | None = None
    width: int | None = None
    heads: int | None = None  # attention heads (DiT, LightningDiT)
    patch_size: int | None = None
    mlp_ratio: float | None = None  # MLP / channel-mix hidden width over width
    d_state: int | None = None  # Mamba: SSM state size per channel
    expand: int | None = None  # Mamba: inner width over width
    scan: str | None = None  # Mamba: scan order, "bidirectional" or "zigzag"
    learn_sigma: bool = False
    routes: list[RouteConfig] = field(default_factory=list)
    keep_order: bool = False  # scan backbones (Mamba, RWKV) always keep order
    fp32_after_reinsert: bool = False

    def __post_init__(self) -> None:
        from ..models import MODEL_CONFIGS

        check_choice("model", "name", self.name, list(MODEL_CONFIGS))
        ints = (*_SHAPE_KEYS, "depth", "width", "heads", "patch_size", "d_state", "expand")
        for key in ints:
            check_at_least_one("model", key, getattr(self, key))
        if self.mlp_ratio is not None:
            check_positive("model", "mlp_ratio", self.mlp_ratio)
        family_keys = self.family_keys()
        for key in ARCH_KEYS:
            if getattr(self, key) is not None and key not in family_keys:
                raise ConfigError(
                    f"model.{key}={getattr(self, key)!r}: {self.name} has no {key} (its "
                    f"architecture keys: {', '.join(k for k in ARCH_KEYS if k in family_keys)})"
                )
        arch = self.architecture()
        if "heads" in arch and arch["width"] % arch["heads"]:
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
        self._check_with_family(arch)
        _check_routes(self.routes, arch["depth"], self.name)

    def family_keys(self) -> set[str]:
        """The architecture keys the registry entry's family has."""
        from ..models import MODEL_CONFIGS

        entry = MODEL_CONFIGS[self.name]
        return {f.name for f in dataclasses.fields(entry)} & set(ARCH_KEYS)  # type: ignore[arg-type]

    def _check_with_family(self, arch: dict[str, Any]) -> None:
        """Let the family's own config check the combination (e.g. RoPE's head-width rule)."""
        from ..models import MODEL_CONFIGS

        shape = {k: getattr(self, k) for k in _SHAPE_KEYS if getattr(self, k) is not None}
        shape.setdefault("input_size", arch["patch_size"])  # unknown until the data is read
        try:
            dataclasses.replace(MODEL_CONFIGS[self.name], **arch, **shape)  # type: ignore[type-var]
        except ValueError as err:
            raise ConfigError(f"model ({self.name}): {err}") from None

    def architecture(self) -> dict[str, Any]:
        """The family's architecture keys: the config's values, else the registry entry's."""
        from ..models import MODEL_CONFIGS

        entry, family_keys = MODEL_CONFIGS[self.name], self.family_keys()
        return {
            key: getattr(entry, key) if getattr(self, key) is None else getattr(self, key)
            for key in ARCH_KEYS
            if key in family_keys
        }

    def describe_architecture(self) -> str:
        """The resolved size in words, e.g. ``depth 8, width 128, 4 heads`` (the family's own
        :meth:`~tread.models.backbone.ArchConfig.describe`)."""
        from ..models import MODEL_CONFIGS

        return dataclasses.replace(MODEL_CONFIGS[self.name], **self.architecture()).describe()

    def with_architecture(self) -> ModelConfig:
        """This config with every architecture field filled in (the registry's where None)."""
        return dataclasses.replace(self, **self.architecture())

    def overrides(self) -> dict[str, Any]:
        """Architecture fields set in the config (the rest come from the registry)."""
        keys = (*_SHAPE_KEYS, *ARCH_KEYS)
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["learn_sigma"] = self.learn_sigma
        return out
