"""Small value checks shared by the config sections; each raises a one-line ConfigError."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    pass


def check_choice(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_positive(section: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{key}={value!r} must be {bound}")


def check_finite(section: str, key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{section}.{key}={value!r} must be a finite number")


def check_at_least_one(section: str, key: str, value: int | None) -> None:
    """None (= automatic / from the data) or an integer >= 1."""
    if value is not None and value < 1:
        raise ConfigError(f"{section}.{key}={value!r} must be >= 1 (or null)")
