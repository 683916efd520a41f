"""``add-labels``: write new or corrected real masks into the ``label`` array of a finished store, in place.

Masks pair with the stored records as in build-masks (:class:`~.labels.LabelIndex`: a folder plus a file-name
template over each record's ``source_rel``, or a pairs CSV whose ``image`` column may also hold a ``sample_id`` or
``source_rel``). They are read and binarised by build-masks' own code (``process.read_mask``; a label volume cut across
the store's ``geometry.slice_axis`` and checked against its image's voxel grid) and placed with each
record's stored geometry (the manifest's crop_* / content_* / resize_mode) through ``process.place_label``, so a
label added later is byte-identical to the one build-masks stores for the same mask.

Resumable after ``kill -9``; everything in flight lives in ``_medsass/add_labels/run/``:

1. ``plan.json``: every accepted (record row, mask) pair and every rejected mask, fixed before any pixel is written;
2. per affected shard, one writer: the shard's new label block (its current labels, the planned rows replaced) is
   saved to ``wal/shard-NNNNNN.npz``, written to the store, then ``done/shard-NNNNNN.json`` records the rows and the
   wal file goes. A re-run skips done shards and writes a saved block again, so it never reads back a shard it may
   have half-written;
3. ``commit.json`` (sha256 of the new manifest), then the manifest, atomically: has_label, label_source,
   label_status, label_reason, label_fg_fraction and label_revision of the written rows. build-masks' per-shard
   parts get the same values (a re-run of build-masks reassembles the same manifest), then manifest.json's counts;
4. ``_medsass/add_labels/report.json`` and a line in ``history.jsonl``; the run folder is removed.

The image and pseudo_mask arrays are never written. A mask whose record already holds the same label bytes is
"unchanged": its shard is not rewritten and its label_revision stays.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medsass import manifest, store
from medsass.errors import StoreError

from .add_labels_plan import labels_request, make_plan, pending_plan
from .add_labels_write import LABEL_COLUMNS, commit, done_path, new_block, record_facts, updated_manifest, write_shard
from .inspect_store import capped

EXIT_OK, EXIT_SOME_REJECTED = 0, 3
FOLDER = "add_labels"


@dataclass
class AddLabelsResult:
    store: Path
    report: dict
    report_path: Path

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_REJECTED if self.report["rejected"] else EXIT_OK


def add_labels(store_path: str | Path, *, labels_dir: str | None = None, pattern: str | None = None,
               stem_regex: str | None = None, pairs: str | None = None) -> AddLabelsResult:
    """Pair the masks of ``labels_dir`` (or ``pairs``) with the records of a finished store and store them as labels."""
    out = Path(store_path)
    request = labels_request(labels_dir, pattern, stem_regex, pairs)
    group, info = store.open_store(out, mode="r+")
    manifest.read_summary(out)  # a finished store (before anything is created in it)
    home = store.work_dir(out) / FOLDER
    run = home / "run"
    with _lock(home):
        df = manifest.read_manifest(out)  # under the lock: as the last add-labels left it
        params = (info.attrs.get("params") or {}).get("geometry") or {}
        max_pixels = int(params.get("max_pixels", 2**28))
        slice_axis = params.get("slice_axis")  # volumes: label volumes are cut as the store's images were
        for old in home.glob("run.finished-*"):  # a finished run killed while its folder was being removed
            shutil.rmtree(old, ignore_errors=True)
        plan = pending_plan(out, run, request)
        if plan is None:
            shutil.rmtree(run, ignore_errors=True)  # killed before its plan existed: it wrote nothing
            plan = make_plan(out, df, request, slice_axis)
            manifest.write_json(plan, run / "plan.json")
        rows = record_facts(df, {it["row"] for it in plan["items"]})
        by_shard: dict[int, list[dict]] = {}
        for it in plan["items"]:
            by_shard.setdefault(it["row"] // info.shard_records, []).append(it)
        for shard, items in sorted(by_shard.items()):
            if not done_path(run, shard).exists():
                write_shard(group, info, run, shard, items, rows, max_pixels, slice_axis=slice_axis)
        report = commit(out, run, plan, sorted(by_shard), info)
        report_path = home / "report.json"
        manifest.write_json(report, report_path)
        _log(home / "history.jsonl", {k: report[k] for k in ("started", "finished", "labels", "counts")})
        finished = home / f"run.finished-{time.time_ns()}"
        os.replace(run, finished)  # one atomic step: from here a re-run starts afresh
        shutil.rmtree(finished, ignore_errors=True)
    return AddLabelsResult(out, report, report_path)


@contextmanager
def _lock(home: Path) -> Iterator[None]:
    """One add-labels per store at a time (the OS drops the lock of a killed process)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another add-labels is running on {home.parents[1]}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log(path: Path, entry: dict) -> None:
    """Append one line per run (a run resumed after its line was written is not logged twice)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and json.loads(lines[-1]).get("started") == entry["started"]:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def format_summary(result: AddLabelsResult, max_list: int = 10) -> str:
    rep, c = result.report, result.report["counts"]
    where = rep["labels"]["pairs"] or rep["labels"]["dir"]
    lines = [f"add-labels {rep['store']}: {c['written']} label(s) written ({c['new']} new, {c['corrected']} corrected) "
             f"in {c['shards_rewritten']} shard(s); {c['unchanged']} unchanged; {c['records_without_mask']} record(s) "
             f"without a mask in {where} kept as they were"]
    if c["ignored"]:
        lines.append(f"{c['ignored']} file(s) ignored (not images)")
    if rep["rejected"]:
        lines.append(f"{c['rejected']} mask(s) rejected, nothing written for them:")
        lines += capped([f"  {r['mask'] or r['sample_id']}: [{r['code']}] {r['reason']}" for r in rep["rejected"]],
                        max_list, "  ... {n} more")
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)


__all__ = ["EXIT_OK", "EXIT_SOME_REJECTED", "LABEL_COLUMNS", "AddLabelsResult", "add_labels", "format_summary", "new_block",
           "updated_manifest", "write_shard"]
