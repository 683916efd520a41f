"""The ledger: ``<results_dir>/results.jsonl``, one JSON line per finished run (commit it).

A run's line holds its key, what it was (dataset, target, arm, seed, labels), the labeled sample ids, the
per-image confusion counts on the test split and on every site (so intervals can be recomputed without the
runs), and the wall time of each part. The study skips every job whose key is in the ledger, so a study
resumes from the ledger alone on another machine; runs and stores in ``out_dir`` only save recomputation (a
pretraining whose checkpoint is gone is run again before the runs that start from it, and must reproduce its line).

Lines are appended whole and flushed; a torn last line (a kill mid-write) is dropped with a warning and cut
away before the next append.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from medsass.errors import MedsassError

LEDGER = "results.jsonl"


def ledger_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / LEDGER


def read_ledger(results_dir: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """key -> row (a later line for the same key wins). ``repair`` cuts a torn last line off the file."""
    path = ledger_path(results_dir)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1:]):
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} bytes; a run was killed while writing it)",
                              stacklevel=2)
                if repair:
                    with path.open("r+b") as fh:
                        fh.truncate(good_bytes)
                break
            raise MedsassError(f"{path} line {i + 1} is not JSON; fix or delete that line (its run will be redone)") from None
        rows[row["key"]] = row
        good_bytes += len(line) + 1
    return rows


def append(results_dir: str | Path, row: dict[str, Any]) -> None:
    path = ledger_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    read_ledger(results_dir, repair=True)
    with path.open("ab") as fh:
        fh.write(json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
