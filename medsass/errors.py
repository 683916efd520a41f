"""Errors shared by prep and trainer.

Every error names what went wrong and, where there is one, what the user should change.
Per-input problems carry a short machine-readable ``code`` (used to group failures in the
manifest summary) and a human ``reason``.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


class MedsassError(Exception):
    """Base class: a problem the user can fix (bad config, bad store, bad input)."""


class ConfigError(MedsassError):
    """A configuration value is missing, unknown or of the wrong type."""


class StoreError(MedsassError):
    """A store is missing, foreign, of an unknown schema version, or inconsistent."""


class CorruptFileError(MedsassError):
    """A file medsass wrote (a log, a manifest part) is damaged; the message names the file, the line and what to do."""


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


class DiskFullError(MedsassError):
    """The disk an output goes to has no room left. Nothing already written is lost; free space and re-run."""


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent); None if unknown."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(exc: BaseException, path: str | Path, what: str) -> DiskFullError | None:
    """A clear error if ``exc`` (or an exception it was raised from) is ENOSPC / EDQUOT, else None.

    Libraries wrap the OSError (torch.save raises ``RuntimeError: ... unexpected pos``), so the chain is walked.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(Path(path))
            free_text = "free space unknown" if free is None else f"{free / 2**20:,.0f} MiB free"
            return DiskFullError(
                f"no space left on the disk holding {path} while writing {what} ({free_text}); "
                "free space there (or write to another disk) and re-run the same command: it resumes from what was saved"
            )
        e = e.__cause__ or e.__context__
    return None


def check_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Raise DiskFullError before writing ``need_bytes`` to ``path`` if the disk cannot hold them."""
    free = _free_bytes(Path(path))
    if free is not None and free < need_bytes:
        raise DiskFullError(
            f"not enough space on the disk holding {path} to write {what}: it needs about {need_bytes / 2**20:,.0f} MiB "
            f"and {free / 2**20:,.0f} MiB are free; free space there (or write to another disk) and re-run the same "
            "command: it resumes from what was saved"
        )


class MedsassWarning(UserWarning):
    """Something was repaired or worked around (a torn log line dropped, an older checkpoint used); the run goes on."""
