"""The manifest: one row per stored record (and one per failed or skipped input).

This module is the contract between prep and trainer: it owns the schema version, the column
set and types, and how a manifest is read and written. The store's arrays are described in
``medsass.store``. Both are documented for users in ``data_manifests/SCHEMA.md``.

A manifest is a Parquet file (``<store>/manifest.parquet``) plus a small JSON summary
(``<store>/manifest.json``). Both are written atomically (temp file + rename).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from medsass.atomic import atomic_write_bytes  # noqa: F401 (re-exported: prep and trainer write through it)
from medsass.errors import StoreError
from medsass.jsonl import read_jsonl

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "manifest.json"

STATUSES = ("ok", "failed", "skipped")
SPLITS = ("train", "val", "test", "")

# Column name -> (arrow type, default for rows that do not have it, description).
COLUMNS: dict[str, tuple[pa.DataType, Any, str]] = {
    "sample_id": (pa.string(), "", "stable id: source path relative to its input root, plus #f<frame> / #t<y>_<x> when a file gives several records"),
    "source": (pa.string(), "", "absolute path of the input file"),
    "source_rel": (pa.string(), "", "path relative to the input argument it was found under"),
    "source_sha256": (pa.string(), "", "sha256 of the input file's bytes ('' when it could not be read)"),
    "source_bytes": (pa.int64(), -1, "size of the input file in bytes"),
    "format": (pa.string(), "", "detected format: dicom, png, jpeg, tiff, gif, bmp, or '' when not an image"),
    "frame": (pa.int32(), 0, "frame (DICOM) or page (TIFF) index within the file"),
    "n_frames": (pa.int32(), 0, "frames/pages in the file"),
    "status": (pa.string(), "", "ok | failed | skipped"),
    "reason_code": (pa.string(), "", "short code grouping failures (decode_error, missing_plugin, no_pixel_data, ...)"),
    "reason": (pa.string(), "", "human-readable reason, naming what to change where possible"),
    "row": (pa.int64(), -1, "index along axis 0 of the store arrays; -1 when not stored"),
    "shard": (pa.int32(), -1, "shard index of the row; -1 when not stored"),
    "orig_height": (pa.int32(), 0, "height of the source frame in pixels"),
    "orig_width": (pa.int32(), 0, "width of the source frame in pixels"),
    "orig_dtype": (pa.string(), "", "numpy dtype of the decoded source pixels"),
    "channels": (pa.int32(), 0, "colour channels in the source (1 gray, 3 RGB, 4 RGBA)"),
    "photometric": (pa.string(), "", "photometric interpretation / Pillow mode"),
    "modality": (pa.string(), "", "DICOM modality (CT, MR, CR, ...) or ''"),
    "crop_y": (pa.int32(), 0, "top of the source region this record covers (tiles; 0 otherwise)"),
    "crop_x": (pa.int32(), 0, "left of the source region"),
    "crop_height": (pa.int32(), 0, "height of the source region"),
    "crop_width": (pa.int32(), 0, "width of the source region"),
    "resize_mode": (pa.string(), "", "stretch | pad | tile"),
    "content_y": (pa.int32(), 0, "top of the resized content inside the stored SxS canvas (pad mode)"),
    "content_x": (pa.int32(), 0, "left of the resized content inside the canvas"),
    "content_height": (pa.int32(), 0, "height of the resized content inside the canvas"),
    "content_width": (pa.int32(), 0, "width of the resized content inside the canvas"),
    "intensity_low": (pa.float64(), 0.0, "source value mapped to 0 in the stored uint8 image"),
    "intensity_high": (pa.float64(), 0.0, "source value mapped to 255 in the stored uint8 image"),
    "method": (pa.string(), "", "threshold method of the pseudo-mask"),
    "threshold": (pa.float64(), float("nan"), "threshold in source intensity units"),
    "polarity": (pa.string(), "", "bright | dark: the side taken as foreground"),
    "fg_fraction": (pa.float64(), float("nan"), "pseudo-mask foreground fraction at native resolution"),
    "qc_flags": (pa.string(), "", "comma-separated QC flags: constant, fg_low, fg_high"),
    "degenerate": (pa.bool_(), False, "pseudo-mask unusable for pretraining (any QC flag)"),
    "has_label": (pa.bool_(), False, "a real (expert) mask is stored in the label array for this row"),
    "label_source": (pa.string(), "", "path of the real mask file"),
    "label_status": (pa.string(), "", "'' (no label searched), ok, missing, shape_mismatch, unreadable"),
    "label_reason": (pa.string(), "", "why a label could not be used"),
    "label_fg_fraction": (pa.float64(), float("nan"), "real-mask foreground fraction at native resolution"),
    "label_revision": (pa.int32(), 0, "versions of this row's label written so far: 0 none, 1 the first (build-masks --labels or add-labels), +1 per add-labels that changed it"),
    "group": (pa.string(), "", "split group key (salted hash for DICOM PatientID; never the raw ID)"),
    "split": (pa.string(), "", "train | val | test ('' when not stored)"),
}

ARROW_SCHEMA = pa.schema([pa.field(name, typ) for name, (typ, _, _) in COLUMNS.items()])

# Optional columns: a manifest has them (after COLUMNS, all four) only when one of its rows was cut from a volume
# (NIfTI), so the manifest of a store without volumes has exactly COLUMNS, as before they existed. Read them with
# ``name in table.column_names`` (or ``df.get(name)``); rows of other inputs in a mixed store hold the defaults.
VOLUME_COLUMNS: dict[str, tuple[pa.DataType, Any, str]] = {
    "slice_axis": (pa.string(), "", "volumes: axial | coronal | sagittal, the axis the volume was cut across after reorientation to RAS+; `frame` is the slice index along it"),
    "volume_shape": (pa.list_(pa.int32()), None, "volumes: the source's data shape in its own voxel order"),
    "volume_affine": (pa.list_(pa.float64()), None, "volumes: the source's 4x4 voxel -> mm (RAS+) affine, row-major (16 values)"),
    "spacing": (pa.list_(pa.float64()), None, "volumes: mm between the record's source pixel rows, pixel columns and slices"),
}

# Columns added after schema version 1 was first written: a manifest without them is still read, the column
# filled from the others (its value for a store written before the column existed).
ADDED_COLUMNS = {
    "label_revision": lambda table: pa.compute.cast(table.column("has_label"), pa.int32()),  # a stored label was version 1
}


def empty_row(**values: Any) -> dict[str, Any]:
    """A manifest row with every column at its default, then ``values`` (which may set VOLUME_COLUMNS too); unknown
    keys raise."""
    unknown = set(values) - set(COLUMNS) - set(VOLUME_COLUMNS)
    if unknown:
        raise KeyError(f"unknown manifest column(s) {sorted(unknown)}; known: {list(COLUMNS) + list(VOLUME_COLUMNS)}")
    row = {name: default for name, (_, default, _) in COLUMNS.items()}
    row.update(values)
    return row


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The manifest table of ``rows``: COLUMNS, plus VOLUME_COLUMNS when a row has any of them."""
    rows = [empty_row(**r) for r in rows]
    if not any(name in r for r in rows for name in VOLUME_COLUMNS):
        return pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    volume = {name: default for name, (_, default, _) in VOLUME_COLUMNS.items()}
    schema = pa.schema([*ARROW_SCHEMA, *(pa.field(name, typ) for name, (typ, _, _) in VOLUME_COLUMNS.items())])
    return pa.Table.from_pylist([{**volume, **r} for r in rows], schema=schema)


def write_rows_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Rows as JSON Lines, atomically: prep's per-shard manifest parts. (Building an Arrow table from Python
    rows makes pyarrow load pandas, ~0.35 s in every Dask worker; the parts become Arrow once, in assemble.)"""
    text = "".join(json.dumps(empty_row(**r), default=_json_scalar) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


def read_rows_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a manifest part. A damaged line is an error naming the part; a torn last line is dropped with a
    warning (parts are written atomically, and build-masks writes a torn part's shard again before assembling)."""
    return read_jsonl(path, remedy="Delete this part and re-run the same build-masks command: its shard is written again")


def _json_scalar(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a manifest value")


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet table atomically."""
    atomic_write_bytes(path, table_bytes(table))


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet file :func:`write_table` writes for ``table``."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"manifest {path} does not exist; build the store with `medsass-prep build-masks` first")
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names and c not in ADDED_COLUMNS]
    if missing:
        raise StoreError(f"manifest {path} lacks column(s) {missing}; it was not written by this medsass schema")
    added = [c for c in ADDED_COLUMNS if c not in table.column_names]
    if added:
        for name in added:
            table = table.append_column(pa.field(name, COLUMNS[name][0]), ADDED_COLUMNS[name](table))
        order = [c for c in COLUMNS if c in table.column_names]
        table = table.select(order + [c for c in table.column_names if c not in COLUMNS])
    return table


def write_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def manifest_path(store: str | Path) -> Path:
    return Path(store) / MANIFEST_FILE


def summary_path(store: str | Path) -> Path:
    return Path(store) / SUMMARY_FILE


def read_manifest(store: str | Path):
    """The store's manifest as a pandas DataFrame, after checking its schema version."""
    summary = read_summary(store)
    check_schema_version(summary.get("schema_version"), where=str(summary_path(store)))
    return read_table(manifest_path(store)).to_pandas()


def read_summary(store: str | Path) -> dict[str, Any]:
    path = summary_path(store)
    if not path.exists():
        raise StoreError(
            f"{store} has no {SUMMARY_FILE}: it is not a finished medsass store "
            "(run or re-run `medsass-prep build-masks` to finish it)"
        )
    return read_json(path)


def check_schema_version(version: Any, *, where: str) -> None:
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise StoreError(
            f"{where} has schema version {version!r}; this medsass reads {list(SUPPORTED_SCHEMA_VERSIONS)}. "
            "Rebuild the store with this version of medsass-prep, or install the medsass version that wrote it."
        )


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, streamed: the one file hash of medsass (inputs, manifests, checkpoints)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def manifest_digest(store: str | Path) -> str:
    """Digest recorded in checkpoints so a run can tell its store changed."""
    return file_digest(manifest_path(store))
