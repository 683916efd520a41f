"""The ledger: ``<results_dir>/results.jsonl``, one JSON line per finished run (commit it).

A run's line holds its key, what it was (dataset, target, arm, seed, labels), the labeled sample ids, the
per-image confusion counts on the test split and on every site (so intervals can be recomputed without the
runs), and the wall time of each part. The study skips every job whose key is in the ledger, so a study
resumes from the ledger alone on another machine; runs and stores in ``out_dir`` only save recomputation (a
pretraining whose checkpoint is gone is run again before the runs that start from it, and must reproduce its line).

Lines are appended whole and flushed, under a lock on the file (parallel studies may share a ledger); a torn
last line (a kill mid-write) is dropped with a warning and cut away before the next append.

Lists that repeat from line to line (a split's image ids and pseudo-mask floor counts, the same in every run on
that split; a seed's labeled ids, shared by every arm) are stored once, as a ``{"blob": DIGEST, "value": [...]}``
line before the first run line that uses them, and referenced as ``{"$blob": DIGEST}``. Readers get whole rows
back; lines written before this (lists inline) read as they are, and :func:`compact` rewrites them.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from medsass.errors import MedsassError
from medsass.metrics import micro_iou

LEDGER = "results.jsonl"


def ledger_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / LEDGER


BLOB_MIN_BYTES = 200  # lists shorter than this as JSON stay inline (a 1-label run's labeled id)


def read_ledger(results_dir: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """key -> row (a later line for the same key wins). ``repair`` cuts a torn last line off the file."""
    return {row["key"]: row for row in read_lines(results_dir, repair=repair)}


def read_lines(results_dir: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Every run line in file order, whole (blob references resolved)."""
    return _whole_rows(ledger_path(results_dir), repair=repair)


def _whole_rows(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    rows, blobs = _read(path, repair=repair)
    return [_resolve(row, blobs) for row in rows]


def _read(path: Path, *, repair: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the run lines as written, digest -> blob value)."""
    if not path.exists():
        return [], {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    blobs: dict[str, Any] = {}
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
                              stacklevel=3)
                if repair:
                    with path.open("r+b") as fh:
                        fh.truncate(good_bytes)
                break
            raise MedsassError(f"{path} line {i + 1} is not JSON; fix or delete that line (its run will be redone)") from None
        if "blob" in row:
            blobs[row["blob"]] = row["value"]
        elif "key" in row:
            rows.append(row)
        else:
            raise MedsassError(f"{path} line {i + 1} is neither a run (no 'key') nor a blob line; fix or delete it")
        good_bytes += len(line) + 1
    missing = sorted({d for row in rows for d in _refs(row) if d not in blobs})
    if missing:
        raise MedsassError(f"{path}: run lines refer to blob(s) {', '.join(missing[:5])} that no line holds (lines were "
                           "deleted?); delete the run lines that use them (their runs will be redone)")
    return rows, blobs


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _blob_slots(row: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(container, field) of every list that may go to a blob: labeled ids, each eval's ids and floor counts (and
    those of the teacher a teacher recipe's run carries, and of the re-labelled start a relabel recipe's run carries)."""
    yield row, "labeled_ids"
    for ev in row.get("evals", {}).values():
        yield ev, "ids"
        yield ev, "floor_counts"
    for part in ("teacher", "relabel"):  # a teacher recipe's run carries its teacher's row, a relabel recipe's its start's
        if isinstance(row.get(part), dict):
            yield from _blob_slots(row[part])


def _refs(row: dict[str, Any]) -> Iterator[str]:
    for box, field in _blob_slots(row):
        v = box.get(field)
        if isinstance(v, dict) and "$blob" in v:
            yield v["$blob"]


def _resolve(row: dict[str, Any], blobs: dict[str, Any]) -> dict[str, Any]:
    if not any(True for _ in _refs(row)):
        return row
    row = copy.deepcopy(row)
    for box, field in _blob_slots(row):
        v = box.get(field)
        if isinstance(v, dict) and "$blob" in v:
            box[field] = copy.deepcopy(blobs[v["$blob"]])
    return row


def _encode(row: dict[str, Any], blobs: dict[str, Any]) -> bytes:
    """The row's line, preceded by a line for each of its blobs not in ``blobs`` yet (added to it)."""
    out = []
    row = copy.deepcopy(row)
    for box, field in _blob_slots(row):
        v = box.get(field)
        if not isinstance(v, list) or len(json.dumps(v, separators=(",", ":"))) < BLOB_MIN_BYTES:
            continue
        d = _digest(v)
        if d not in blobs:
            blobs[d] = v
            out.append({"blob": d, "value": v})
        box[field] = {"$blob": d}
    out.append(row)
    return b"".join(json.dumps(x, sort_keys=True, separators=(",", ":")).encode() + b"\n" for x in out)


def append(results_dir: str | Path, row: dict[str, Any]) -> None:
    path = ledger_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path) as fh:
        _, blobs = _read(path, repair=True)
        fh.write(_encode(row, blobs))
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def _locked(path: Path) -> Iterator[BinaryIO]:
    """The ledger opened for appending, under an exclusive lock (released on close); reopened when :func:`compact`
    replaced the file while we waited for the lock."""
    while True:
        fh = path.open("ab")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        if path.exists() and os.fstat(fh.fileno()).st_ino == path.stat().st_ino:
            break
        fh.close()
    with fh:
        yield fh


def compact(results_dir: str | Path) -> tuple[int, int]:
    """Rewrite the ledger with repeated lists stored once (every run line kept, in order); (bytes before, after)."""
    path = ledger_path(results_dir)
    if not path.exists():
        raise MedsassError(f"no ledger at {path}")
    before = path.stat().st_size
    with _locked(path):
        rows = read_lines(results_dir)
        blobs: dict[str, Any] = {}
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as out:
            for row in rows:
                out.write(_encode(row, blobs))
            out.flush()
            os.fsync(out.fileno())
        if _whole_rows(tmp) != rows:
            tmp.unlink()
            raise MedsassError(f"{path}: the compacted ledger does not read back the same; left as it was")
        os.replace(tmp, path)
    return before, path.stat().st_size


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
