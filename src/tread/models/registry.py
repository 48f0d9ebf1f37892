"""Model registry with the DiT paper's names: DiT-{S,B,L,XL}/{2,4,8}; SiT-* are the same nets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..routing import Route
from .dit import DiT, DiTConfig

# (depth, width, heads) per size, DiT paper Table 1.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

MODEL_CONFIGS: dict[str, DiTConfig] = {}
for _family in ("DiT", "SiT"):
    for _size, (_depth, _width, _heads) in _SIZES.items():
        for _patch in (2, 4, 8):
            MODEL_CONFIGS[f"{_family}-{_size}/{_patch}"] = DiTConfig(
                depth=_depth, width=_width, heads=_heads, patch_size=_patch
            )

_BUILD_OPTIONS = ("routes", "keep_order", "fp32_after_reinsert", "generator")


def build_model(name: str, **overrides: Any) -> DiT:
    """Build a registered backbone, overriding any architecture field or build option.

    Args:
        name: a registry key such as ``"DiT-B/2"`` or ``"SiT-XL/2"``.
        **overrides: ``DiTConfig`` fields (``input_size``, ``in_channels``, ``num_classes``,
            ``learn_sigma``, ``depth``, ``width``, ...) and ``routes`` (training-time default
            routes), ``keep_order``, ``fp32_after_reinsert``, ``generator`` (initial weights).

    Raises:
        ValueError: unknown name or override, or an invalid route for the model's depth.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    options = {key: overrides.pop(key) for key in _BUILD_OPTIONS if key in overrides}
    fields = {field.name for field in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {name}; "
            f"valid: {', '.join(sorted(fields | set(_BUILD_OPTIONS)))}"
        )
    config = dataclasses.replace(MODEL_CONFIGS[name], **overrides)
    routes: Sequence[Route] = options.pop("routes", ()) or ()
    return DiT(config, routes, **options)
