"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

A reader, or a re-run after ``kill -9``, sees the old file or the new one, never half of one. The file gets
the permissions ``open()`` would give it (0666 minus the umask), so a store or run folder shared with a
group stays readable by it; ``tempfile.mkstemp`` would leave every such file 0600. Pass ``mode=0o600`` for
a secret (the store's salt).
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: str | Path, *, mode: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` when the block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the umask applies, as for open()
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(data)
