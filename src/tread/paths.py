"""Checks on places a command will write, run before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def check_creatable(path: str | Path, what: str) -> None:
    """``path`` exists as a writable directory, or can be created under one.

    Walks up to the nearest existing ancestor (``path`` itself if it exists): that must be a
    directory this process may write to.

    Args:
        path: a directory to write into, or the folder a new file will go to.
        what: how the error names the setting, e.g. ``train.run_dir=runs/x`` or ``output x.png``.

    Raises:
        ConfigError: ``{what}: {ancestor} is a file, not a directory`` or
            ``{what}: directory {ancestor} is not writable``.
    """
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: directory {existing} is not writable")
