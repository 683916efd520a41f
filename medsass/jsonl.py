"""JSON Lines files that grow by appends (``metrics.jsonl``, ``runs.jsonl``) or are written whole (prep's manifest parts).

A kill in the middle of an append leaves a torn last line: no newline at its end, and not valid JSON. Readers drop
it with a warning; ``repair=True`` (and every :func:`append_jsonl`) also cuts it off the file, so the next line
starts clean instead of gluing itself to the fragment. A line that is not JSON anywhere else means the file was
damaged, not torn: that is a :class:`CorruptFileError` naming the file, the line and what to do.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from medsass.errors import CorruptFileError, MedsassWarning

_TORN = object()
DEFAULT_REMEDY = "fix or delete that line and re-run"


def read_jsonl(path: str | Path, *, repair: bool = False, remedy: str = DEFAULT_REMEDY) -> list[Any]:
    """The records of ``path``, one per non-blank line; see the module docstring for torn and damaged lines.

    ``remedy`` ends the error for a damaged line: what the user should do about this kind of file."""
    path = Path(path)
    if repair:
        repair_tail(path)
    *lines, tail = path.read_bytes().split(b"\n")
    records = [_parse(path, number, raw, remedy) for number, raw in enumerate(lines, 1) if raw.strip()]
    if tail.strip():
        record = _whole(tail)
        if record is _TORN:
            _warn_torn(path, len(lines) + 1, len(tail), stacklevel=3)
        else:
            records.append(record)
    return records


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append ``record`` as one line, after cutting off a torn last line (with a warning)."""
    path = Path(path)
    if path.exists():
        repair_tail(path)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def repair_tail(path: str | Path) -> None:
    """Make ``path`` end with a newline: a torn last line is cut off (with a warning), a whole one gets its newline."""
    path = Path(path)
    start, tail = _last_line(path)
    if not tail:
        return
    if _whole(tail) is _TORN:
        _warn_torn(path, None, len(tail), stacklevel=4)
        os.truncate(path, start)
    else:  # whole record, only its newline missing
        with path.open("ab") as fh:
            fh.write(b"\n")


def ends_complete(path: str | Path) -> bool:
    """Whether ``path`` is empty or ends with a newline (reads one byte)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _last_line(path: Path, block: int = 1 << 16) -> tuple[int, bytes]:
    """(offset, bytes) of what follows the last newline of ``path`` (b'' when it ends with one)."""
    with path.open("rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        start = 0
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            k = fh.read(step).rfind(b"\n")
            if k >= 0:
                start = pos + k + 1
                break
        fh.seek(start)
        return start, fh.read()


def _whole(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return _TORN


def _parse(path: Path, number: int, raw: bytes, remedy: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CorruptFileError(
            f"{path}, line {number}: not valid JSON ({exc}). Only the last line of this file can be torn by a kill; "
            f"this one is damaged. {remedy}"
        ) from None


def _warn_torn(path: Path, number: int | None, size: int, *, stacklevel: int) -> None:
    where = f"line {number}, " if number else ""
    warnings.warn(f"{path}: dropped a torn last line ({where}{size} bytes; a run was killed while writing it)",
                  MedsassWarning, stacklevel=stacklevel)
