"""What a shared copy keeps of a store's manifest, attributes and ``manifest.json`` (``medsass-prep share``).

One rule per manifest column (:data:`COLUMN_POLICY`); attributes and summaries keep a fixed list of keys whose values
are numbers, booleans or code-like strings (:func:`plain`), so a path or free text never passes. The rules themselves
are described in :mod:`.share`.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa

from medsass import __version__, manifest, store

from .share_ids import Keys
from .window import parse_window

WITHHELD = "withheld in a shared copy (medsass-prep share)"
_CODE = re.compile(r"[A-Za-z0-9_ ,.:+<>|=-]{0,64}")  # what a kept string may look like: a code, never a path

# manifest column -> what the shared copy holds. A column added to medsass.manifest.COLUMNS needs an entry here
# (tests/pipeline/test_share.py checks), so that each new column is a decision, not a leak.
KEEP, CODE, BLANK, OPAQUE, REASON = "keep", "code", "blank", "opaque", "reason"
COLUMN_POLICY = {
    "sample_id": OPAQUE, "source": OPAQUE, "group": OPAQUE,
    "source_rel": BLANK, "source_sha256": BLANK, "source_bytes": BLANK, "label_source": BLANK,
    "reason": REASON, "label_reason": REASON,
    **{c: CODE for c in ("format", "status", "reason_code", "orig_dtype", "photometric", "modality", "resize_mode",
                         "method", "polarity", "qc_flags", "label_status", "split")},
    **{c: KEEP for c in ("frame", "n_frames", "row", "shard", "orig_height", "orig_width", "channels", "crop_y",
                         "crop_x", "crop_height", "crop_width", "content_y", "content_x", "content_height",
                         "content_width", "intensity_low", "intensity_high", "threshold", "fg_fraction", "degenerate",
                         "has_label", "label_fg_fraction", "label_revision")},
    # volumes (manifest.VOLUME_COLUMNS, present only in stores with NIfTI inputs): geometry, carried (module doc)
    "slice_axis": CODE, "volume_shape": KEEP, "volume_affine": KEEP, "spacing": KEEP,
}
ROOT_ATTRS = ("schema_version", "kind", "size", "n_records", "shard_records", "created_with")
SUMMARY_KEYS = ("schema_version", "created_with", "packages", "store", "counts", "n_inputs", "n_labeled",
                "n_degenerate", "splits")
PROVENANCE_KEYS = ("name", "array", "sidecar", "round", "rule", "source_sha256", "source_step", "source_model",
                   "parent_target", "splits", "n_records", "n_degenerate", "fg_fraction_mean", "mean_confidence",
                   "created", "medsass_version", "torch_version")


def shared_manifest(table: pa.Table, keys: Keys, dropped: list[str]) -> pa.Table:
    """The manifest ``table`` under :data:`COLUMN_POLICY`, in the schema's column order; ``dropped`` gets what went."""
    columns = dict(manifest.COLUMNS)
    if any(c in table.column_names for c in manifest.VOLUME_COLUMNS):  # all four, after the others (manifest.py)
        columns.update(manifest.VOLUME_COLUMNS)
    cols = {}
    for name, (typ, default, _) in columns.items():
        policy = COLUMN_POLICY.get(name)
        values = table.column(name).to_pylist() if name in table.column_names else None
        if values is None or policy is None:
            dropped.append(f"manifest column {name} (no sharing rule in medsass.pipeline.share)")
            values, policy = [default] * table.num_rows, KEEP
        if policy == OPAQUE:
            opaque = {"sample_id": keys.sample, "source": keys.source, "group": keys.group}[name]
            values = [opaque(v) for v in values]
        elif policy == BLANK:
            values = [default] * len(values)
        elif policy == CODE:
            values = [code(v) for v in values]
        elif policy == REASON:
            code_col = "reason_code" if name == "reason" else "label_status"
            values = [code(c) if v else "" for v, c in zip(values, table.column(code_col).to_pylist())]
        cols[name] = pa.array(values, typ)
    dropped += [f"manifest column {c}" for c in table.column_names if c not in columns]
    return pa.table(cols, schema=pa.schema([pa.field(name, typ) for name, (typ, _, _) in columns.items()]))


def code(value: Any) -> str:
    """``value`` as a string if it looks like a code, else ``other``."""
    value = "" if value is None else str(value)
    return value if _CODE.fullmatch(value) else "other"


def plain(value: Any) -> Any:
    """Numbers, booleans, None and code-like strings, recursively; anything else (a path, free text) is dropped."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if _CODE.fullmatch(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if _CODE.fullmatch(str(k))}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return None


def _shared_params(params: dict, dropped: list[str]) -> dict:
    out: dict[str, Any] = {"sources": WITHHELD}
    for key in ("geometry", "threshold"):
        if isinstance(params.get(key), dict):
            out[key] = plain(params[key])
    if "window" in out.get("threshold", {}):  # an intensity window, never a path, though "40/400" is not code-like
        out["threshold"]["window"] = _window(params["threshold"]["window"])
    split = dict(params.get("split") or {})
    if split:
        group_by = str(split.get("group_by", ""))
        out["split"] = {k: plain(split[k]) for k in ("val", "test", "seed", "split_unlabeled") if k in split}
        out["split"]["group_by"] = group_by if group_by in ("file", "dir") else "regex (pattern withheld)"
        if split.get("groups_csv"):
            out["split"]["groups_csv"] = WITHHELD
    if "shard_records" in params:
        out["shard_records"] = plain(params["shard_records"])
    dropped += [f"params.{k}" for k in params if k not in out]
    return out


def _window(value: Any) -> str | None:
    """The window's own spelling (pipeline/window.py: a preset, ``percentile`` or C/W numbers); None (withheld: predict
    then refuses the copy) for anything that is not a window."""
    try:
        parsed = parse_window(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed.spec if parsed else None


def shared_attrs(attrs: dict, pseudo: dict, names: list[str], dropped: list[str]) -> dict:
    """The store group's attributes for the copy (``params_digest`` recomputed over the params kept); ``pseudo``:
    the provenance of the pseudo-label arrays ``names``."""
    out = {k: plain(attrs[k]) for k in ROOT_ATTRS if k in attrs}
    if isinstance(attrs.get("intensity"), str) and not re.search(r"[/\\]", attrs["intensity"]):
        out["intensity"] = attrs["intensity"]  # build-masks' fixed sentence on the uint8 mapping
    out["params"] = _shared_params(dict(attrs.get("params") or {}), dropped)
    out["params_digest"] = hashlib.sha256(json.dumps(out["params"], sort_keys=True).encode()).hexdigest()[:16]
    if names:
        out[store.PSEUDO_GROUP] = {n: {k: plain(pseudo[n][k]) for k in PROVENANCE_KEYS if k in pseudo[n]}
                                   for n in names if n in pseudo}
    dropped += [f"attrs.{k}" for k in attrs if k not in out and k != store.PSEUDO_GROUP]
    dropped += [f"attrs.{store.PSEUDO_GROUP}.{n}.{k}" for n in names for k in pseudo.get(n, {}) if k not in PROVENANCE_KEYS]
    out["shared"] = {"created_with": f"medsass {__version__}", "ids": "HMAC-SHA256 of the original values, keyed by "
                     "the store's salt; the mapping stays in the original store's _medsass/share/ids.parquet",
                     "withheld": "source paths, file names, label paths, file hashes and sizes, failure texts, "
                     "input folders"}
    return out


def shared_summary(summary: dict, attrs: dict, dropped: list[str]) -> dict:
    """``manifest.json`` for the copy: the kept keys, failure counts by code, and the copy's params."""
    out = {k: plain(summary[k]) for k in SUMMARY_KEYS if k in summary}
    for k in ("failures_by_code", "skipped_by_code"):
        counts: dict[str, int] = {}
        for c, n in (summary.get(k) or {}).items():
            counts[code(c)] = counts.get(code(c), 0) + int(n)
        out[k] = counts
    out.update(params=attrs["params"], params_digest=attrs["params_digest"], shared=attrs["shared"])
    dropped += [f"manifest.json {k}" for k in summary if k not in out]
    return out
