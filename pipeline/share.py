"""``medsass-prep share``: a copy of a store that can leave the hospital.

Clinical exports put names, MRNs and dates in folder and file names, so a store's manifest (sample_id, source,
source_rel, label_source, failure reasons) and attributes (the build's input folders) carry them. The shared copy
keeps what training, evaluation and predict need and nothing that names a file, a folder or a patient:

- ``sample_id`` -> ``rec-`` + 20 hex of HMAC-SHA256(salt, sample id): opaque, and the same on every re-share of
  the store (same salt); ``source`` -> ``file-`` + 16 hex of the same over the source path (records of one file
  still share it); ``group`` -> 16 hex of the same over the original group hash (not linkable to the original
  store, nor to other stores built with the same salt);
- ``source_rel``, ``label_source``, ``source_sha256`` -> ''; ``source_bytes`` -> -1; ``reason`` / ``label_reason``
  (may quote library text with paths) -> their code; every other string column must look like a code (no '/',
  short) or becomes ``other``;
- the volume columns (NIfTI: ``slice_axis``, ``volume_shape``, ``volume_affine``, ``spacing``) are carried: they are
  the scan's geometry (voxel grid and its place in scanner coordinates), not who it is, as in any published NIfTI
  dataset; whoever holds the original scans could match a record to its series by them, as by its pixels. The copy
  stays usable as the original for volume-wise work (predict writes label volumes from its input's own header, with
  the store's slice axis and window, both carried);
- attributes and manifest.json: ``params.sources`` (input and label folders), ``split.groups_csv`` and the
  ``regex:`` pattern of ``split.group_by`` go, ``threshold.window`` stays (a preset or C/W numbers such as ``40/400``,
  which the code-like rule would drop for its '/'), ``params_digest`` is recomputed over what is left; a self-training
  provenance loses ``source_checkpoint`` (a path); unknown keys are dropped and listed (teach this module about
  them);
- array chunks are copied byte for byte (pixels are the data being shared: text burned into pixels stays);
  ``_medsass/`` (salt, plan with paths, parts, logs) and any file this module does not know are not copied.

The private mapping (shared id -> sample_id, source, source_rel, label_source, group) is written to the original
store's ``_medsass/share/ids.parquet``, mode 0600, before the copy exists. Before the copy is moved into place,
every string of its manifest, sidecars and JSON is checked against the original's paths, ids and salt.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medsass import __version__, manifest, store
from medsass.errors import StoreError

from .window import parse_window

SHARE_DIR = "share"  # under the original store's _medsass/
MAP_FILE = "ids.parquet"
KEY_FILE = "key.json"
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
ARRAY_ATTRS = ("encoding", "round", "mode")  # attrs["medsass"] of a pseudo-label array
SIDECAR_COLUMNS = ("row", "split", "fg_fraction", "mean_confidence", "degenerate")  # + sample_id, made opaque


@dataclass
class ShareResult:
    out: Path
    mapping: Path
    n_rows: int
    n_records: int
    dropped: list[str] = field(default_factory=list)  # attributes, columns and files not carried over
    volumes: bool = False  # the manifest's volume columns (NIfTI geometry: affines, spacing) were carried


class _Keys:
    """The opaque ids: HMAC-SHA256 keyed by the store's salt, one domain per kind of value."""

    def __init__(self, salt: str):
        self.key = salt.encode()

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"medsass-share:{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def sample(self, v: str) -> str:
        return "rec-" + self._mac("sample", v)[:20] if v else ""

    def source(self, v: str) -> str:
        return "file-" + self._mac("source", v)[:16] if v else ""

    def group(self, v: str) -> str:
        return self._mac("group", v)[:16] if v else ""

    def check(self) -> str:
        return self._mac("key-check", "")[:16]


def share_store(store_path: str | Path, out: str | Path, *, salt: str | None = None, overwrite: bool = False) -> ShareResult:
    """Write the shared copy of ``store_path`` to ``out``; the id mapping stays in the original's ``_medsass/``."""
    src, out = Path(store_path), Path(out)
    group, info = store.open_store(src)
    if "shared" in info.attrs:
        raise StoreError(f"{src} is already a shared copy; copy it as it is")
    summary = manifest.read_summary(src)  # a finished store
    _check_out(src, out, overwrite)
    run = store.work_dir(src) / "add_labels" / "run"
    if run.exists():
        raise StoreError(f"an add-labels on {src} is unfinished ({run}); finish it (re-run it) before sharing")
    digest = manifest.manifest_digest(src)
    keys = _Keys(_store_salt(src, salt))
    table = manifest.read_table(manifest.manifest_path(src))
    mapping, forbidden = _mapping(table, keys, src)
    try:
        map_path = _write_private(src, keys, mapping)
    except PermissionError as exc:
        raise StoreError(f"cannot write the private id mapping into {store.work_dir(src)} ({exc.strerror}); it lives "
                         "only there, so sharing needs write access to the store") from None

    dropped: list[str] = []
    tmp = out.parent / f".{out.name}.sharing-{secrets.token_hex(4)}"
    tmp.mkdir()  # the permissions a new folder gets (mkdtemp's 0700 would keep the copy from its readers)
    try:
        shared = _shared_manifest(table, keys, dropped)
        manifest.write_table(shared, manifest.manifest_path(tmp))
        names = _copy_arrays(src, tmp, group, dropped)
        by_id = dict(zip(mapping["sample_id"].to_pylist(), mapping["shared_id"].to_pylist()))
        pseudo = dict(info.attrs.get(store.PSEUDO_GROUP) or {})
        for name in names:
            _copy_sidecar(src, tmp, name, by_id, dropped)
        attrs = _shared_attrs(info.attrs, pseudo, names, dropped)
        _write_json(tmp / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {store.ATTRS_KEY: attrs}})
        manifest.write_json(_shared_summary(summary, attrs, dropped), manifest.summary_path(tmp))
        store.consolidate(tmp)
        for extra in sorted(set(os.listdir(src)) - _KNOWN_TOP):
            dropped.append(f"file {extra} (not part of the store layout)")
        _verify(tmp, forbidden, keys.key.decode())
        if manifest.manifest_digest(src) != digest or run.exists():
            raise StoreError(f"{src} changed while it was being shared (an add-labels?); run share again")
        if out.exists():
            shutil.rmtree(out)  # an earlier shared copy (checked, with --overwrite)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShareResult(out, map_path, len(shared), info.n_records, dropped,
                       volumes=any(c in shared.column_names for c in manifest.VOLUME_COLUMNS))


_KNOWN_TOP = {"zarr.json", manifest.MANIFEST_FILE, manifest.SUMMARY_FILE, store.WORK_DIR, store.PSEUDO_GROUP,
              *store.IMAGE_ARRAYS}


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise StoreError(f"the shared copy {out} must lie outside the store {src} (and not contain it)")
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent} does not exist; create it first")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        try:
            earlier = "shared" in store.open_store(out)[1].attrs
        except Exception:
            earlier = False
        if not earlier:
            raise StoreError(f"{out} exists and is not a shared copy of a store; choose a new OUT (medsass never "
                             "deletes foreign data)")
        if not overwrite:
            raise StoreError(f"{out} holds an earlier shared copy; pass --overwrite to replace it")


def _store_salt(src: Path, salt: str | None) -> str:
    path = store.work_dir(src) / "salt"
    if path.exists():  # the store's own salt wins: the ids must not depend on what the environment holds
        own = path.read_text().strip()
        if salt and salt != own:
            raise StoreError(f"{src} keeps its own salt ({path}) and the salt given (--salt, --salt-file or "
                             "MEDSASS_SALT) differs; give none (unset MEDSASS_SALT)")
        return own
    if salt:
        return salt
    raise StoreError(f"{src} keeps no salt ({path}): it was built with --salt / --salt-file / MEDSASS_SALT. Give "
                     "the same salt to share (--salt-file or MEDSASS_SALT), so that shared ids stay the same")


def _mapping(table: pa.Table, keys: _Keys, src: Path) -> tuple[pa.Table, set[str]]:
    """The private mapping, and the strings that must not appear in the copy."""
    col = {c: table.column(c).to_pylist() for c in ("sample_id", "source", "source_rel", "label_source", "group",
                                                     "reason", "label_reason", "status", "row")}
    shared = [keys.sample(s) for s in col["sample_id"]]
    pairs = {}
    for s, o in zip(col["sample_id"], shared):
        if pairs.setdefault(o, s) != s:  # pragma: no cover - 80 bits
            raise StoreError(f"two sample ids of {src} give the same shared id {o}; report this")
    mapping = pa.table({
        "shared_id": shared, "sample_id": col["sample_id"], "status": col["status"], "row": col["row"],
        "source": col["source"], "shared_source": [keys.source(s) for s in col["source"]],
        "source_rel": col["source_rel"], "label_source": col["label_source"],
        "group": col["group"], "shared_group": [keys.group(g) for g in col["group"]],
    })
    vocab = {v for c, p in COLUMN_POLICY.items() if p == CODE and c in table.column_names for v in table.column(c).to_pylist()}
    secret = {v for c in ("sample_id", "source", "source_rel", "label_source", "group", "reason", "label_reason")
              for v in col[c] if len(v) >= 4} - vocab
    for s in col["source"] + col["label_source"]:  # folder and file names, but not plain words (train, images, ...)
        secret |= {p for p in Path(s).parts if len(p) >= 4 and not p.isalpha() and p not in vocab}
    return mapping, secret | {keys.key.decode()}


def _write_private(src: Path, keys: _Keys, mapping: pa.Table) -> Path:
    home = store.work_dir(src) / SHARE_DIR
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_file = home / KEY_FILE
    if key_file.exists() and json.loads(key_file.read_text()).get("key_check") != keys.check():
        raise StoreError(f"{src} was shared before with another salt ({key_file}); give the salt of that share, "
                         "or the shared ids would change")
    manifest.atomic_write_bytes(key_file, json.dumps({"key_check": keys.check()}).encode(), mode=0o600)
    path = home / MAP_FILE
    manifest.atomic_write_bytes(path, manifest.table_bytes(mapping), mode=0o600)  # as secret as the salt
    os.chmod(path, 0o600)  # atomic_write_bytes applies the umask, which may not clear the owner's bits only
    return path


def _shared_manifest(table: pa.Table, keys: _Keys, dropped: list[str]) -> pa.Table:
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
            values = [_code(v) for v in values]
        elif policy == REASON:
            code_col = "reason_code" if name == "reason" else "label_status"
            values = [_code(c) if v else "" for v, c in zip(values, table.column(code_col).to_pylist())]
        cols[name] = pa.array(values, typ)
    dropped += [f"manifest column {c}" for c in table.column_names if c not in columns]
    return pa.table(cols, schema=pa.schema([pa.field(name, typ) for name, (typ, _, _) in columns.items()]))


def _code(value: Any) -> str:
    value = "" if value is None else str(value)
    return value if _CODE.fullmatch(value) else "other"


def _plain(value: Any) -> Any:
    """Numbers, booleans, None and code-like strings, recursively; anything else (a path, free text) is dropped."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if _CODE.fullmatch(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if _CODE.fullmatch(str(k))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None


def _shared_params(params: dict, dropped: list[str]) -> dict:
    out: dict[str, Any] = {"sources": WITHHELD}
    for key in ("geometry", "threshold"):
        if isinstance(params.get(key), dict):
            out[key] = _plain(params[key])
    if "window" in out.get("threshold", {}):  # an intensity window, never a path, though "40/400" is not code-like
        out["threshold"]["window"] = _window(params["threshold"]["window"])
    split = dict(params.get("split") or {})
    if split:
        group_by = str(split.get("group_by", ""))
        out["split"] = {k: _plain(split[k]) for k in ("val", "test", "seed", "split_unlabeled") if k in split}
        out["split"]["group_by"] = group_by if group_by in ("file", "dir") else "regex (pattern withheld)"
        if split.get("groups_csv"):
            out["split"]["groups_csv"] = WITHHELD
    if "shard_records" in params:
        out["shard_records"] = _plain(params["shard_records"])
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


def _shared_attrs(attrs: dict, pseudo: dict, names: list[str], dropped: list[str]) -> dict:
    out = {k: _plain(attrs[k]) for k in ROOT_ATTRS if k in attrs}
    if isinstance(attrs.get("intensity"), str) and not re.search(r"[/\\]", attrs["intensity"]):
        out["intensity"] = attrs["intensity"]  # build-masks' fixed sentence on the uint8 mapping
    out["params"] = _shared_params(dict(attrs.get("params") or {}), dropped)
    out["params_digest"] = hashlib.sha256(json.dumps(out["params"], sort_keys=True).encode()).hexdigest()[:16]
    if names:
        out[store.PSEUDO_GROUP] = {n: {k: _plain(pseudo[n][k]) for k in PROVENANCE_KEYS if k in pseudo[n]}
                                   for n in names if n in pseudo}
    dropped += [f"attrs.{k}" for k in attrs if k not in out and k != store.PSEUDO_GROUP]
    dropped += [f"attrs.{store.PSEUDO_GROUP}.{n}.{k}" for n in names for k in pseudo.get(n, {}) if k not in PROVENANCE_KEYS]
    out["shared"] = {"created_with": f"medsass {__version__}", "ids": "HMAC-SHA256 of the original values, keyed by "
                     "the store's salt; the mapping stays in the original store's _medsass/share/ids.parquet",
                     "withheld": "source paths, file names, label paths, file hashes and sizes, failure texts, "
                     "input folders"}
    return out


def _shared_summary(summary: dict, attrs: dict, dropped: list[str]) -> dict:
    out = {k: _plain(summary[k]) for k in SUMMARY_KEYS if k in summary}
    for k in ("failures_by_code", "skipped_by_code"):
        counts: dict[str, int] = {}
        for code, n in (summary.get(k) or {}).items():
            counts[_code(code)] = counts.get(_code(code), 0) + int(n)
        out[k] = counts
    out.update(params=attrs["params"], params_digest=attrs["params_digest"], shared=attrs["shared"])
    dropped += [f"manifest.json {k}" for k in summary if k not in out]
    return out


def _write_json(path: Path, obj: dict) -> None:
    manifest.atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _copy_arrays(src: Path, dst: Path, group, dropped: list[str]) -> list[str]:
    """Copy the image arrays and pseudo-label arrays (chunk files byte for byte); returns the pseudo-label names."""
    names = sorted(group[store.PSEUDO_GROUP].array_keys()) if store.PSEUDO_GROUP in group else []
    for path in [*store.IMAGE_ARRAYS, *(f"{store.PSEUDO_GROUP}/{n}" for n in names)]:
        meta = json.loads((src / path / "zarr.json").read_text())
        sub = (meta.get("attributes") or {}).get(store.ATTRS_KEY) or {}
        attrs = {store.ATTRS_KEY: {k: _plain(sub[k]) for k in ARRAY_ATTRS if k in sub}} if sub else {}
        dropped += [f"{path} attribute {k}" for k in (meta.get("attributes") or {}) if k != store.ATTRS_KEY]
        dropped += [f"{path} attribute {store.ATTRS_KEY}.{k}" for k in sub if k not in ARRAY_ATTRS]
        meta["attributes"] = attrs
        meta.pop("dimension_names", None)
        (dst / path).mkdir(parents=True)
        _write_json(dst / path / "zarr.json", meta)
        for root, _, files in os.walk(src / path / "c"):
            rel = Path(root).relative_to(src / path)
            for f in files:
                if all(p.isdigit() for p in (*rel.parts[1:], f)):  # chunk keys c/<i>/<j>/<k>
                    (dst / path / rel).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(root) / f, dst / path / rel / f)  # no times or owners carried over
                else:
                    dropped.append(f"{path}/{rel / f} (not a chunk)")
    if names:
        _write_json(dst / store.PSEUDO_GROUP / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})
    return names


def _copy_sidecar(src: Path, dst: Path, name: str, by_id: dict[str, str], dropped: list[str]) -> None:
    path = Path(store.PSEUDO_GROUP) / f"{name}.parquet"
    if not (src / path).exists():
        return
    table = pq.read_table(src / path)
    cols = {"sample_id": pa.array([by_id.get(s) or "" for s in table.column("sample_id").to_pylist()], pa.string())}
    cols.update({c: table.column(c) for c in SIDECAR_COLUMNS if c in table.column_names})
    dropped += [f"{path} column {c}" for c in table.column_names if c not in cols]
    manifest.write_table(pa.table(cols), dst / path)


def _verify(tmp: Path, secret: set[str], salt: str) -> None:
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


def format_summary(result: ShareResult) -> str:
    lines = [f"shared copy   {result.out}  ({result.n_records} stored records, {result.n_rows} manifest rows, opaque ids)",
             f"private map   {result.mapping}  (mode 0600; never share it, nor the salt beside it)",
             "not removed   text burned into the pixels; image sizes, modality, splits, QC and label statistics"
             + ("; volume geometry (voxel grid, affine, spacing)" if result.volumes else "")]
    if result.dropped:
        lines.append("not carried   " + "; ".join(result.dropped))
    return "\n".join(lines)


__all__ = ["COLUMN_POLICY", "ShareResult", "format_summary", "share_store"]
