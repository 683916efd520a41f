"""``add-labels``: write new or corrected real masks into the ``label`` array of a finished store, in place.

Masks pair with the stored records as in build-masks (:class:`~.labels.LabelIndex`: a folder plus a file-name
template over each record's ``source_rel``, or a pairs CSV whose ``image`` column may also hold a ``sample_id`` or
``source_rel``). They are read and binarised by build-masks' own code (``process.read_mask``) and placed with each
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
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from medsass import manifest, store
from medsass.atomic import atomic_open
from medsass.errors import ConfigError, InputError, StoreError, disk_full

from . import geometry
from .config import LabelSource, resolve_path
from .discover import sniff
from .labels import LabelIndex
from .process import place_label, read_mask, shape_mismatch_reason
from .readers import probe
from .shards import part_path

EXIT_OK, EXIT_SOME_REJECTED = 0, 3
FOLDER = "add_labels"
# the manifest columns add-labels writes, for the rows it labels
LABEL_COLUMNS = ("has_label", "label_source", "label_status", "label_reason", "label_fg_fraction", "label_revision")
_PLACEMENT = ("crop_y", "crop_x", "crop_height", "crop_width", "content_y", "content_x", "content_height", "content_width")
_FACTS = ("row", "sample_id", "source", "frame", "n_frames", "orig_height", "orig_width", "resize_mode", "has_label") + _PLACEMENT


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
    request = _request(labels_dir, pattern, stem_regex, pairs)
    group, info = store.open_store(out, mode="r+")
    manifest.read_summary(out)  # a finished store (before anything is created in it)
    home = store.work_dir(out) / FOLDER
    run = home / "run"
    with _lock(home):
        df = manifest.read_manifest(out)  # under the lock: as the last add-labels left it
        for old in home.glob("run.finished-*"):  # a finished run killed while its folder was being removed
            shutil.rmtree(old, ignore_errors=True)
        plan = _pending_plan(out, run, request)
        if plan is None:
            shutil.rmtree(run, ignore_errors=True)  # killed before its plan existed: it wrote nothing
            plan = _make_plan(out, df, request)
            manifest.write_json(plan, run / "plan.json")
        facts = _facts(df, {it["row"] for it in plan["items"]})
        params = (info.attrs.get("params") or {}).get("geometry") or {}
        max_pixels = int(params.get("max_pixels", 2**28))
        by_shard: dict[int, list[dict]] = {}
        for it in plan["items"]:
            by_shard.setdefault(it["row"] // info.shard_records, []).append(it)
        for shard, items in sorted(by_shard.items()):
            if not _done_path(run, shard).exists():
                write_shard(group, info, run, shard, items, facts, max_pixels)
        report = _commit(out, run, plan, sorted(by_shard), info)
        report_path = home / "report.json"
        manifest.write_json(report, report_path)
        _log(home / "history.jsonl", {k: report[k] for k in ("started", "finished", "labels", "counts")})
        finished = home / f"run.finished-{time.time_ns()}"
        os.replace(run, finished)  # one atomic step: from here a re-run starts afresh
        shutil.rmtree(finished, ignore_errors=True)
    return AddLabelsResult(out, report, report_path)


# ----------------------------------------------------------------------------- request, lock, plan


def _request(labels_dir, pattern, stem_regex, pairs) -> dict:
    if bool(labels_dir) == bool(pairs):
        raise ConfigError("give the masks as --labels DIR (with --label-pattern) or as --pairs CSV, exactly one of them")
    if pairs and (pattern or stem_regex):
        raise ConfigError("--label-pattern and --stem-regex apply to --labels DIR; a --pairs CSV names each mask itself")

    cwd = Path.cwd()  # as build-masks resolves its --labels and --pairs
    spec = LabelSource(dir=resolve_path(labels_dir, cwd), stem_regex=stem_regex, pairs=resolve_path(pairs, cwd))
    if pattern:
        spec.pattern = pattern
    return {"dir": spec.dir, "pattern": spec.pattern, "stem_regex": spec.stem_regex, "pairs": spec.pairs}


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


def _pending_plan(out: Path, run: Path, request: dict) -> dict | None:
    """The plan of an unfinished run of the same request, or None when there is none."""
    if not (run / "plan.json").exists():
        return None
    plan = manifest.read_json(run / "plan.json")
    if plan["labels"] != request:
        shown = f"--pairs {plan['labels']['pairs']}" if plan["labels"]["pairs"] else (
            f"--labels {plan['labels']['dir']} --label-pattern '{plan['labels']['pattern']}'")
        raise StoreError(
            f"{out} has an unfinished add-labels ({shown}) whose shards are partly written; run that command again to "
            "finish it, then this one"
        )
    now = manifest.manifest_digest(out)
    committed = run / "commit.json"
    if now != plan["manifest_sha256"] and not (committed.exists() and manifest.read_json(committed)["manifest_sha256"] == now):
        raise StoreError(
            f"{manifest.manifest_path(out)} changed since the unfinished add-labels in {run} started (was the store "
            f"rebuilt?); its labels may be partly written: remove {run} and run add-labels again"
        )
    return plan


def _make_plan(out: Path, df, request: dict) -> dict:
    """Pair every stored record's source with a mask; probe each mask's header (frames, shape)."""
    index = LabelIndex(LabelSource(**request))
    cols = {c: df[c].tolist() for c in ("source", "source_rel", "sample_id", "status", "reason", "row", "n_frames",
                                        "orig_height", "orig_width")}
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(cols["source"]):
        by_source.setdefault(src, []).append(i)
    items, rejected, used = [], [], set()
    n_without = 0
    for src, idx in by_source.items():
        stored = [i for i in idx if cols["status"][i] == "ok" and cols["row"][i] >= 0]
        first = (stored or idx)[0]
        aliases = tuple(dict.fromkeys([cols["sample_id"][i] for i in idx] + [cols["source_rel"][first]]))
        p = index.pair(src, cols["source_rel"][first], aliases)
        what = {"sample_id": cols["sample_id"][first], "source": src}
        if p.status == "ambiguous":
            used.update(_real(c) for c in p.candidates)
            rejected.append({"mask": "", **what, "code": "ambiguous", "reason": p.reason + "; make --label-pattern match one file"})
            continue
        if p.status != "ok":
            n_without += len(stored)
            continue
        used.add(_real(p.path))
        if not stored:
            rejected.append({"mask": p.path, **what, "code": "image_not_stored",
                             "reason": f"its image was not stored by build-masks ({cols['status'][first]}: {cols['reason'][first]})"})
            continue
        shape = (int(cols["orig_height"][first]), int(cols["orig_width"][first]))
        problem = _check_mask(p.path, int(cols["n_frames"][first]), shape)
        if problem:
            rejected.append({"mask": p.path, **what, "code": problem[0], "reason": problem[1]})
            continue
        items += [{"row": int(cols["row"][i]), "label_source": p.path} for i in stored]
    ignored = []
    sources = {_real(s) for s in by_source}
    for f in sorted(index.files - used):
        if f in sources:
            continue  # an image of the store that happens to sit in the label folder
        if _sniff(f) is None:
            ignored.append({"file": f, "reason": "not an image medsass reads"})
        else:
            how = f"--label-pattern '{request['pattern']}'" if request["dir"] else f"the pairs CSV {request['pairs']}"
            rejected.append({"mask": f, "sample_id": "", "source": "", "code": "no_record",
                             "reason": f"no record of the store pairs with it under {how}; check the pattern "
                                       "(fields {stem} {name} {ext} {rel_stem} {rel_dir} of the manifest's source_rel)"})
    return {"version": 1, "labels": request, "manifest_sha256": manifest.manifest_digest(out), "started": time.time(),
            "items": sorted(items, key=lambda it: it["row"]), "rejected": rejected, "ignored": ignored,
            "records_without_mask": n_without}


def _real(path: str) -> str:
    return str(Path(path).resolve())


def _sniff(path: str) -> str | None:
    try:
        return sniff(Path(path))
    except OSError:
        return None


def _check_mask(path: str, n_frames: int, shape: tuple[int, int]) -> tuple[str, str] | None:
    """(code, reason) when the mask's header does not fit the record's source image, else None."""
    fmt = _sniff(path)
    if fmt is None:
        return "unreadable", f"{path} is not an image medsass reads (DICOM, PNG, JPEG, TIFF, GIF, BMP)"
    try:
        pr = probe(Path(path), fmt)
    except InputError as exc:
        return "unreadable", f"{path}: {exc.reason}"
    if pr.n_frames != n_frames:
        return "frames_mismatch", f"mask has {pr.n_frames} frame(s), image has {n_frames}"
    if tuple(pr.shape) != shape:
        return "shape_mismatch", shape_mismatch_reason(pr.shape, shape) + "; a mask must have its source image's size"
    return None


def _facts(df, rows: set[int]) -> dict[int, dict]:
    """Per planned row: what the shard writer needs from its manifest row (placement, frame, shape, label state)."""
    sel = df[(df["status"] == "ok") & df["row"].isin(list(rows))]
    out = {}
    for rec in sel[list(_FACTS) + ["label_revision"]].to_dict("records"):
        rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
        rec["placement"] = geometry.Placement(*(int(rec[k]) for k in _PLACEMENT), rec["resize_mode"])
        out[int(rec["row"])] = rec
    return out


# ----------------------------------------------------------------------------- shards


def _done_path(run: Path, shard: int) -> Path:
    return run / "done" / f"shard-{shard:06d}.json"


def _wal_path(run: Path, shard: int) -> Path:
    return run / "wal" / f"shard-{shard:06d}.npz"


def write_shard(group, info, run: Path, shard: int, items: list[dict], facts: dict[int, dict], max_pixels: int) -> None:
    """Write the planned labels of one shard (its only writer), then its done record."""
    start, stop = info.shard_bounds(shard)
    wal = _wal_path(run, shard)
    if wal.exists():  # killed while writing this shard: write the saved block again, never read back the shard
        with np.load(wal) as z:
            block, result = z["block"], json.loads(z["result"].tobytes())
        store.drop_shard(group, store.LABEL, shard)  # it may be torn; zarr would read it before writing
    else:
        old = np.asarray(group[store.LABEL][start:stop])
        block, result = new_block(old, start, items, facts, info.size, max_pixels)
        if any(r["changed"] for r in result["rows"]):
            with atomic_open(wal) as fh:
                np.savez_compressed(fh, block=block, result=np.frombuffer(json.dumps(result).encode(), np.uint8))
        else:
            block = None  # every mask equals the stored label: nothing to write
    if block is not None:
        try:
            store.write_rows(group, start, {store.LABEL: block})
        except Exception as exc:
            full = disk_full(exc, info.path, f"label shard {shard}")
            if full is not None:
                raise full from exc
            raise
    manifest.write_json(result, _done_path(run, shard))
    wal.unlink(missing_ok=True)


def new_block(old: np.ndarray, start: int, items: list[dict], facts: dict[int, dict], size: int,
              max_pixels: int) -> tuple[np.ndarray, dict]:
    """The shard's label block with the planned rows replaced, and per row what happened."""
    block = old.copy()
    rows, rejected = [], []
    by_mask: dict[str, list[dict]] = {}
    for it in items:
        by_mask.setdefault(it["label_source"], []).append(facts[it["row"]])
    for path, recs in by_mask.items():
        masks, status, reason = read_mask(path, recs[0]["n_frames"], sorted({r["frame"] for r in recs}), max_pixels)
        problems = {}
        for r in recs:
            mask, shape = masks.get(r["frame"]), (r["orig_height"], r["orig_width"])
            if status != "ok" or mask is None or mask.shape != shape:
                code, why = (status, reason) if status != "ok" else (
                    ("unreadable", f"frame {r['frame']} was not decoded") if mask is None
                    else ("shape_mismatch", shape_mismatch_reason(mask.shape, shape)))
                problems.setdefault(code, {"mask": path, "sample_id": r["sample_id"], "source": r["source"],
                                           "code": code, "reason": why})
                continue
            canvas, fg = place_label(mask, r["placement"], size)
            i = r["row"] - start
            changed = not r["has_label"] or not np.array_equal(canvas, old[i])
            block[i] = canvas
            rows.append({"row": r["row"], "label_source": path, "label_fg_fraction": fg, "changed": bool(changed),
                         "had_label": bool(r["has_label"])})
        rejected += problems.values()
    return block, {"rows": rows, "rejected": rejected}


# ----------------------------------------------------------------------------- manifest and report


def _commit(out: Path, run: Path, plan: dict, shards: list[int], info) -> dict:
    results = [manifest.read_json(_done_path(run, s)) for s in shards]
    done = {r["row"]: r for res in results for r in res["rows"]}
    path = manifest.manifest_path(out)
    commit = run / "commit.json"
    now = manifest.manifest_digest(out)
    table = manifest.read_table(path)
    if not (commit.exists() and manifest.read_json(commit)["manifest_sha256"] == now):
        new = updated_manifest(table, done)
        if not new.equals(table):
            data = manifest.table_bytes(new)
            manifest.write_json({"manifest_sha256": hashlib.sha256(data).hexdigest()}, commit)
            manifest.atomic_write_bytes(path, data)
            table = new
        else:
            manifest.write_json({"manifest_sha256": now}, commit)
    labels = {c: table.column(c).to_pylist() for c in ("row", "status", "sample_id", *LABEL_COLUMNS)}
    pos = {r: i for i, (r, s) in enumerate(zip(labels["row"], labels["status"])) if s == "ok" and r >= 0}
    _update_parts(out, info.shard_records, {r: {c: labels[c][pos[r]] for c in LABEL_COLUMNS} for r in done})
    summary = manifest.read_summary(out)
    n_labeled = sum(1 for h, s in zip(labels["has_label"], labels["status"]) if h and s == "ok")
    if summary.get("n_labeled") != n_labeled:
        manifest.write_json({**summary, "n_labeled": n_labeled}, manifest.summary_path(out))
    written = [{"sample_id": labels["sample_id"][pos[r]], "row": r, "label_source": d["label_source"],
                "label_revision": labels["label_revision"][pos[r]], "new": not d["had_label"]}
               for r, d in sorted(done.items()) if d["changed"]]
    rejected = plan["rejected"] + [x for res in results for x in res["rejected"]]
    counts = {"written": len(written), "new": sum(w["new"] for w in written),
              "corrected": sum(not w["new"] for w in written), "unchanged": len(done) - len(written),
              "rejected": len(rejected), "records_without_mask": plan["records_without_mask"],
              "ignored": len(plan["ignored"]), "shards_rewritten": sum(any(r["changed"] for r in res["rows"]) for res in results)}
    return {"store": str(out), "labels": plan["labels"], "started": plan["started"], "finished": time.time(),
            "counts": counts, "written": written, "rejected": rejected, "ignored": plan["ignored"]}


def updated_manifest(table: pa.Table, done: dict[int, dict]) -> pa.Table:
    """``table`` with the label columns of the rows in ``done`` set (label_revision + 1 where the bytes changed)."""
    cols = {c: table.column(c).to_pylist() for c in ("row", "status", *LABEL_COLUMNS)}
    for i, (r, s) in enumerate(zip(cols["row"], cols["status"])):
        d = done.get(r) if s == "ok" else None
        if d is None:
            continue
        revision = max(int(cols["label_revision"][i]), int(bool(cols["has_label"][i])))  # older manifests: see ADDED_COLUMNS
        cols["has_label"][i], cols["label_source"][i], cols["label_status"][i] = True, d["label_source"], "ok"
        cols["label_reason"][i], cols["label_fg_fraction"][i] = "", d["label_fg_fraction"]
        cols["label_revision"][i] = revision + 1 if d["changed"] else revision
    for c in LABEL_COLUMNS:
        field = table.schema.field(c)
        table = table.set_column(table.schema.get_field_index(c), field, pa.array(cols[c], field.type))
    return table


def _log(path: Path, entry: dict) -> None:
    """Append one line per run (a run resumed after its line was written is not logged twice)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and json.loads(lines[-1]).get("started") == entry["started"]:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _update_parts(out: Path, shard_records: int, values: dict[int, dict]) -> None:
    """Give build-masks' per-shard manifest parts the new label values (its re-assembly then keeps them)."""
    for shard in sorted({r // shard_records for r in values}):
        path = part_path(out, shard)
        if not path.exists():
            continue
        rows = manifest.read_rows_jsonl(path)
        new = [{**r, **values[r["row"]]} if r["status"] == "ok" and r["row"] in values else r for r in rows]
        if json.dumps(new) != json.dumps(rows):
            manifest.write_rows_jsonl(new, path)


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
        for r in rep["rejected"][:max_list]:
            lines.append(f"  {r['mask'] or r['sample_id']}: [{r['code']}] {r['reason']}")
        if c["rejected"] > max_list:
            lines.append(f"  ... {c['rejected'] - max_list} more")
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)


__all__ = ["EXIT_OK", "EXIT_SOME_REJECTED", "AddLabelsResult", "add_labels", "format_summary", "new_block",
           "updated_manifest", "write_shard"]
