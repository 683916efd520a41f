"""add-labels, the writes: one writer per affected label shard (a saved block first, so a killed run never reads
back a shard it may have half-written), then the manifest, build-masks' per-shard parts and the report.

See :mod:`.add_labels` for the order of the files in ``_medsass/add_labels/run/`` and what a re-run does with them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from medsass import manifest, store
from medsass.atomic import atomic_open
from medsass.errors import disk_full

from . import geometry
from .add_labels_plan import volume_columns
from .process import place_label, read_mask, shape_mismatch_reason
from .shards import part_path

# the manifest columns add-labels writes, for the rows it labels
LABEL_COLUMNS = ("has_label", "label_source", "label_status", "label_reason", "label_fg_fraction", "label_revision")
_PLACEMENT = ("crop_y", "crop_x", "crop_height", "crop_width", "content_y", "content_x", "content_height", "content_width")
_FACTS = ("row", "sample_id", "source", "frame", "n_frames", "orig_height", "orig_width", "resize_mode", "has_label") + _PLACEMENT


def record_facts(df, rows: set[int]) -> dict[int, dict]:
    """Per planned row: what the shard writer needs from its manifest row (placement, frame, shape, label state, and
    a volume's columns as ``volume``: the grid its label volume must lie on)."""
    sel = df[(df["status"] == "ok") & df["row"].isin(list(rows))]
    out = {}
    for rec, volume in zip(sel[list(_FACTS) + ["label_revision"]].to_dict("records"), volume_columns(sel)):
        rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
        rec["placement"] = geometry.Placement(*(int(rec[k]) for k in _PLACEMENT), rec["resize_mode"])
        rec["volume"] = volume
        out[int(rec["row"])] = rec
    return out


def done_path(run: Path, shard: int) -> Path:
    return run / "done" / f"shard-{shard:06d}.json"


def _wal_path(run: Path, shard: int) -> Path:
    return run / "wal" / f"shard-{shard:06d}.npz"


def write_shard(group, info, run: Path, shard: int, items: list[dict], facts: dict[int, dict], max_pixels: int, *,
                slice_axis: str | None = None) -> None:
    """Write the planned labels of one shard (its only writer), then its done record. ``slice_axis``: the store's
    ``geometry.slice_axis``, across which label volumes are cut."""
    start, stop = info.shard_bounds(shard)
    wal = _wal_path(run, shard)
    if wal.exists():  # killed while writing this shard: write the saved block again, never read back the shard
        with np.load(wal) as z:
            block, result = z["block"], json.loads(z["result"].tobytes())
        store.drop_shard(group, store.LABEL, shard)  # it may be torn; zarr would read it before writing
    else:
        old = np.asarray(group[store.LABEL][start:stop])
        block, result = new_block(old, start, items, facts, info.size, max_pixels, slice_axis=slice_axis)
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
    manifest.write_json(result, done_path(run, shard))
    wal.unlink(missing_ok=True)


def new_block(old: np.ndarray, start: int, items: list[dict], facts: dict[int, dict], size: int,
              max_pixels: int, *, slice_axis: str | None = None) -> tuple[np.ndarray, dict]:
    """The shard's label block with the planned rows replaced, and per row what happened."""
    block = old.copy()
    rows, rejected = [], []
    by_mask: dict[str, list[dict]] = {}
    for it in items:
        by_mask.setdefault(it["label_source"], []).append(facts[it["row"]])
    for path, recs in by_mask.items():
        masks, status, reason = read_mask(path, recs[0]["n_frames"], sorted({r["frame"] for r in recs}), max_pixels,
                                          slice_axis=slice_axis, volume=recs[0].get("volume"))
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


def commit(out: Path, run: Path, plan: dict, shards: list[int], info) -> dict:
    results = [manifest.read_json(done_path(run, s)) for s in shards]
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
