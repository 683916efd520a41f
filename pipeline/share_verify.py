"""The last check of a shared copy before it is moved into place (``medsass-prep share``): no string of its manifest,
sidecars or JSON equals an original path, path component, id, group or failure text, and no JSON file contains the
salt."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medsass.errors import StoreError

from .share_scrub import CODE, COLUMN_POLICY

SECRET_COLUMNS = ("sample_id", "source", "source_rel", "label_source", "group", "reason", "label_reason")


def forbidden(table: pa.Table, salt: str) -> set[str]:
    """The strings of the original manifest ``table`` that must not appear in the copy, and the salt. Values of the
    code columns (formats, splits, ...) and plain words (train, images, ...) are allowed."""
    col = {c: table.column(c).to_pylist() for c in SECRET_COLUMNS}
    vocab = {v for c, p in COLUMN_POLICY.items() if p == CODE and c in table.column_names for v in table.column(c).to_pylist()}
    secret = {v for c in SECRET_COLUMNS for v in col[c] if len(v) >= 4} - vocab
    for s in col["source"] + col["label_source"]:  # folder and file names, but not plain words (train, images, ...)
        secret |= {p for p in Path(s).parts if len(p) >= 4 and not p.isalpha() and p not in vocab}
    return secret | {salt}


def verify(tmp: Path, secret: set[str], salt: str) -> None:
    """No string of the copy's manifest, sidecars or JSON equals an original path, path component, id, group or
    failure text, and no JSON file contains the salt."""
    hits: list[str] = []
    for path in sorted(tmp.rglob("*")):
        if path.suffix == ".parquet":
            strings = [v for c in pq.read_table(path).columns if pa.types.is_string(c.type) for v in c.to_pylist()]
        elif path.suffix == ".json" or path.name == "zarr.json":
            text = path.read_text()
            strings = list(_strings(json.loads(text))) + ([salt] if salt in text else [])
        else:
            continue
        hits += [f"{path.relative_to(tmp)}: {v!r}" for v in set(strings) if v in secret]
    if hits:
        raise StoreError("the shared copy would still hold original paths or ids, nothing was written: "
                         + "; ".join(sorted(hits)[:5]) + "; report this")


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
