"""Writing safely: checks on places a command will write (run before anything is written),
and files replaced in one step so a reader never sees half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import BinaryIO

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


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process and call (pid + random suffix).

    Ranks of one job (or two jobs) that cache the same file never share a temporary name, so
    one cannot truncate or rename away another's half-written file.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_open(path: str | PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on success it replaces `path` in one ``os.replace``.

    Readers see the old file or the complete new one, never a partial write; on error the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
