"""Errors shared by prep and trainer.

Every error names what went wrong and, where there is one, what the user should change.
Per-input problems carry a short machine-readable ``code`` (used to group failures in the
manifest summary) and a human ``reason``.
"""
from __future__ import annotations

from pathlib import Path


class MedsassError(Exception):
    """Base class: a problem the user can fix (bad config, bad store, bad input)."""


class ConfigError(MedsassError):
    """A configuration value is missing, unknown or of the wrong type."""


class StoreError(MedsassError):
    """A store is missing, foreign, of an unknown schema version, or inconsistent."""


class InputError(MedsassError):
    """One input file (or frame) cannot be used. The run records it and continues."""

    def __init__(self, path: str | Path, code: str, reason: str):
        self.path = str(path)
        self.code = code
        self.reason = reason
        super().__init__(f"{self.path}: {reason} [{code}]")


class SkipInput(InputError):
    """An input that is skipped on purpose (no pixel data, DICOMDIR, SR, PDF, ...)."""


class MissingPluginError(InputError):
    """Decoding needs an optional plugin that is not installed; the reason names it."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(path, "missing_plugin", reason)
