"""Exceptions with a one-line, user-facing message (the CLI prints them without a traceback)."""

from __future__ import annotations


class TreadError(Exception):
    """Base class: ``str(err)`` is a complete one-line message naming the key, file or value."""


class ConfigError(TreadError, ValueError):
    """A bad config key or value."""


class DataError(TreadError, ValueError):
    """A missing, unreadable or malformed dataset."""


class CheckpointError(TreadError, RuntimeError):
    """A missing, corrupt or incompatible checkpoint."""
