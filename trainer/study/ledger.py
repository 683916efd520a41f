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
import math
import os
import warnings
from pathlib import Path
from typing import Any

from medsass.errors import MedsassError
from medsass.metrics import micro_iou

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


def reproduces(row: dict[str, Any], old: dict[str, Any]) -> str | None:
    """None when a rerun's row matches the ledger's, else what differs (zero-shot counts; SimCLR's final loss)."""
    if row["kind"] == "ssl":
        new_loss, old_loss = row["ssl"]["loss_last"], old.get("ssl", {}).get("loss_last")
        if old_loss is None or not math.isclose(new_loss, old_loss, rel_tol=1e-6, abs_tol=1e-9):
            return f"final SimCLR loss {new_loss:.6g}, the ledger's {old_loss}"
        return None
    for split, ev in old.get("evals", {}).items():
        new = row.get("evals", {}).get(split)
        if new is None or new["ids"] != ev["ids"] or new["counts"] != ev["counts"]:
            got = "missing" if new is None else f"{micro_iou(new['counts']):.4f}"
            return f"zero-shot IoU on {split} {got}, the ledger's {micro_iou(ev['counts']):.4f}"
    return None


def same_realizations(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Adopted rerun's key -> the key of the earliest realization of the same start (the original, or an earlier
    adopted rerun) that it reproduced in every compared figure (the same zero-shot counts on every split; SimCLR: the
    same final loss), both ways. Training is deterministic per CPU type: a machine of the type that made an earlier
    realization makes it again, and the runs from either are runs from one start. Reruns that reproduced nothing
    earlier are left out."""
    by_start: dict[str, list[tuple[int, str]]] = {}
    for key, r in rows.items():
        if r.get("rerun_of"):
            by_start.setdefault(r["rerun_of"], []).append((int(r["realization"]), key))
    out: dict[str, str] = {}
    for base, reruns in by_start.items():
        earlier = [base] if base in rows else []
        for _, key in sorted(reruns):
            twin = next((e for e in earlier if _comparable(rows[key]) and _comparable(rows[e])
                         and reproduces(rows[key], rows[e]) is None and reproduces(rows[e], rows[key]) is None), None)
            if twin is not None:
                out[key] = out.get(twin, twin)
            earlier.append(key)
    return out


def _comparable(row: dict[str, Any]) -> bool:
    """A row with figures to compare (a row without any would match every other)."""
    return bool(row.get("ssl", {}).get("loss_last") is not None if row.get("kind") == "ssl" else row.get("evals"))
