"""The arrays and pseudo-label sidecars of a shared copy (``medsass-prep share``).

Array chunks are copied byte for byte (pixels are the data being shared); each array's ``zarr.json`` keeps its
metadata but only the medsass attributes a pseudo-label array needs (:data:`ARRAY_ATTRS`); a file under an array
that is not a chunk is not copied. A sidecar keeps :data:`SIDECAR_COLUMNS`, with its sample ids made opaque.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medsass import manifest, store

from .share_scrub import plain

ARRAY_ATTRS = ("encoding", "round", "mode")  # attrs["medsass"] of a pseudo-label array
SIDECAR_COLUMNS = ("row", "split", "fg_fraction", "mean_confidence", "degenerate")  # + sample_id, made opaque


def write_json(path: Path, obj: dict) -> None:
    manifest.atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def copy_arrays(src: Path, dst: Path, group, dropped: list[str]) -> list[str]:
    """Copy the image arrays and pseudo-label arrays (chunk files byte for byte); returns the pseudo-label names."""
    names = sorted(group[store.PSEUDO_GROUP].array_keys()) if store.PSEUDO_GROUP in group else []
    for path in [*store.IMAGE_ARRAYS, *(f"{store.PSEUDO_GROUP}/{n}" for n in names)]:
        meta = json.loads((src / path / "zarr.json").read_text())
        sub = (meta.get("attributes") or {}).get(store.ATTRS_KEY) or {}
        attrs = {store.ATTRS_KEY: {k: plain(sub[k]) for k in ARRAY_ATTRS if k in sub}} if sub else {}
        dropped += [f"{path} attribute {k}" for k in (meta.get("attributes") or {}) if k != store.ATTRS_KEY]
        dropped += [f"{path} attribute {store.ATTRS_KEY}.{k}" for k in sub if k not in ARRAY_ATTRS]
        meta["attributes"] = attrs
        meta.pop("dimension_names", None)
        (dst / path).mkdir(parents=True)
        write_json(dst / path / "zarr.json", meta)
        for root, _, files in os.walk(src / path / "c"):
            rel = Path(root).relative_to(src / path)
            for f in files:
                if all(p.isdigit() for p in (*rel.parts[1:], f)):  # chunk keys c/<i>/<j>/<k>
                    (dst / path / rel).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(root) / f, dst / path / rel / f)  # no times or owners carried over
                else:
                    dropped.append(f"{path}/{rel / f} (not a chunk)")
    if names:
        write_json(dst / store.PSEUDO_GROUP / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})
    return names


def copy_sidecar(src: Path, dst: Path, name: str, by_id: dict[str, str], dropped: list[str]) -> None:
    """The sidecar of pseudo-label array ``name``, if any, with ``by_id`` (sample_id -> shared id) applied."""
    path = Path(store.PSEUDO_GROUP) / f"{name}.parquet"
    if not (src / path).exists():
        return
    table = pq.read_table(src / path)
    cols = {"sample_id": pa.array([by_id.get(s) or "" for s in table.column("sample_id").to_pylist()], pa.string())}
    cols.update({c: table.column(c) for c in SIDECAR_COLUMNS if c in table.column_names})
    dropped += [f"{path} column {c}" for c in table.column_names if c not in cols]
    manifest.write_table(pa.table(cols), dst / path)
