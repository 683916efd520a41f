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
  provenance loses ``source_checkpoint`` (a path); unknown keys are dropped and listed (teach
  share_scrub.py about them);
- array chunks are copied byte for byte (pixels are the data being shared: text burned into pixels stays);
  ``_medsass/`` (salt, plan with paths, parts, logs) and any file this module does not know are not copied.

The private mapping (shared id -> sample_id, source, source_rel, label_source, group) is written to the original
store's ``_medsass/share/ids.parquet``, mode 0600, before the copy exists. Before the copy is moved into place,
every string of its manifest, sidecars and JSON is checked against the original's paths, ids and salt.

The parts, one module each: share_ids.py (the opaque ids and the private map), share_scrub.py (the column rules and
what the attributes and manifest.json keep), share_copy.py (arrays and sidecars), share_verify.py (the last check).
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medsass import manifest, store
from medsass.errors import StoreError

from .share_copy import copy_arrays, copy_sidecar, write_json
from .share_ids import Keys, id_mapping, store_salt, write_private
from .share_scrub import COLUMN_POLICY, shared_attrs, shared_manifest, shared_summary
from .share_verify import forbidden, verify


@dataclass
class ShareResult:
    out: Path
    mapping: Path
    n_rows: int
    n_records: int
    dropped: list[str] = field(default_factory=list)  # attributes, columns and files not carried over
    volumes: bool = False  # the manifest's volume columns (NIfTI geometry: affines, spacing) were carried


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
    keys = Keys(store_salt(src, salt))
    table = manifest.read_table(manifest.manifest_path(src))
    mapping = id_mapping(table, keys, src)
    secret = forbidden(table, keys.key.decode())
    try:
        map_path = write_private(src, keys, mapping)
    except PermissionError as exc:
        raise StoreError(f"cannot write the private id mapping into {store.work_dir(src)} ({exc.strerror}); it lives "
                         "only there, so sharing needs write access to the store") from None

    dropped: list[str] = []
    tmp = out.parent / f".{out.name}.sharing-{secrets.token_hex(4)}"
    tmp.mkdir()  # the permissions a new folder gets (mkdtemp's 0700 would keep the copy from its readers)
    try:
        shared = shared_manifest(table, keys, dropped)
        manifest.write_table(shared, manifest.manifest_path(tmp))
        names = copy_arrays(src, tmp, group, dropped)
        by_id = dict(zip(mapping["sample_id"].to_pylist(), mapping["shared_id"].to_pylist()))
        pseudo = dict(info.attrs.get(store.PSEUDO_GROUP) or {})
        for name in names:
            copy_sidecar(src, tmp, name, by_id, dropped)
        attrs = shared_attrs(info.attrs, pseudo, names, dropped)
        write_json(tmp / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {store.ATTRS_KEY: attrs}})
        manifest.write_json(shared_summary(summary, attrs, dropped), manifest.summary_path(tmp))
        store.consolidate(tmp)
        for extra in sorted(set(os.listdir(src)) - _KNOWN_TOP):
            dropped.append(f"file {extra} (not part of the store layout)")
        verify(tmp, secret, keys.key.decode())
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


def format_summary(result: ShareResult) -> str:
    lines = [f"shared copy   {result.out}  ({result.n_records} stored records, {result.n_rows} manifest rows, opaque ids)",
             f"private map   {result.mapping}  (mode 0600; never share it, nor the salt beside it)",
             "not removed   text burned into the pixels; image sizes, modality, splits, QC and label statistics"
             + ("; volume geometry (voxel grid, affine, spacing)" if result.volumes else "")]
    if result.dropped:
        lines.append("not carried   " + "; ".join(result.dropped))
    return "\n".join(lines)


__all__ = ["COLUMN_POLICY", "ShareResult", "format_summary", "share_store"]
