"""Suite-wide: say up front how much disk the temporary folder has (a full disk fails tests in odd places)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

NEEDS_GIB = 1.0  # ~4x the suite's measured peak under the temp folder (230 MB; passed tests' tmp_path are deleted)


def _temp_free(config) -> tuple[str, float | None]:
    base = str(config.option.basetemp or tempfile.gettempdir())
    try:
        return base, shutil.disk_usage(base if os.path.isdir(base) else tempfile.gettempdir()).free / 2**30
    except OSError:
        return base, None


def pytest_report_header(config) -> str:
    base, free = _temp_free(config)
    return f"temp folder {base}: " + ("free space unknown" if free is None else f"{free:.1f} GiB free")


def pytest_sessionstart(session) -> None:
    base, free = _temp_free(session.config)
    if free is not None and free < NEEDS_GIB:
        print(f"\nWARNING: {free:.1f} GiB free under {base}; the suite needs about {NEEDS_GIB} GiB there. "
              "Free space, or point --basetemp / TMPDIR at a larger disk.", file=sys.stderr)
