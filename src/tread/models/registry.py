"""Model registry: DiT-{S,B,L,XL}/{2,4,8} with the DiT paper's names (SiT-* are the same nets),
plus every other backbone family's entries (each family module lists its own)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .backbone import ArchConfig, RoutableBackbone
from .dit import DiTConfig
from .lightning import registry_entries as _lightning_entries
from .mamba import registry_entries as _mamba_entries
from .rwkv import registry_entries as _rwkv_entries

# (depth, width, heads) per size, DiT paper Table 1.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _dit_entries() -> dict[str, ArchConfig]:
    return {
        f"{family}-{size}/{patch}": DiTConfig(
            depth=depth, width=width, heads=heads, patch_size=patch
        )
        for family in ("DiT", "SiT")
        for size, (depth, width, heads) in _SIZES.items()
        for patch in (2, 4, 8)
    }


MODEL_CONFIGS: dict[str, ArchConfig] = {
    **_dit_entries(),
    **_lightning_entries(),
    **_mamba_entries(),
    **_rwkv_entries(),
}

_BUILD_OPTIONS = ("routes", "keep_order", "fp32_after_reinsert", "generator")


def arch_fields(config: ArchConfig) -> set[str]:
    """The architecture fields a config accepts as overrides (its dataclass fields)."""
    return {field.name for field in dataclasses.fields(config)}  # type: ignore[arg-type]


def build_model(name: str, **overrides: Any) -> RoutableBackbone:
    """Build a registered backbone, overriding any architecture field or build option.

    Args:
        name: a registry key such as ``"DiT-B/2"``, ``"SiT-XL/2"`` or ``"Mamba-S/2"``.
        **overrides: fields of the entry's config (``input_size``, ``in_channels``,
            ``num_classes``, ``learn_sigma``, ``depth``, ``width``, ...) and ``routes``
            (training-time default routes), ``keep_order``, ``fp32_after_reinsert``,
            ``generator`` (initial weights).

    Raises:
        ValueError: unknown name or override, or an invalid route for the model's depth.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    options = {key: overrides.pop(key) for key in _BUILD_OPTIONS if key in overrides}
    entry = MODEL_CONFIGS[name]
    fields = arch_fields(entry)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {name}; "
            f"valid: {', '.join(sorted(fields | set(_BUILD_OPTIONS)))}"
        )
    config = dataclasses.replace(entry, **overrides)  # type: ignore[type-var]
    routes = options.pop("routes", ()) or ()
    return config.build(routes, **options)
