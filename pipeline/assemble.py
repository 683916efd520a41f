"""Phase 3 of build-masks, assembly: the manifest from the shards' parts and the plan, the summary, then the store's
consolidated metadata.

The manifest has one row per stored record, failed frame or input skipped/failed at planning, in plan order
(``manifest.parquet``); the summary (``manifest.json``) holds the parameters, package versions and the counts
``medsass-prep inspect`` also reports (:func:`.inspect_store.manifest_counts`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa

from medsass import __version__, manifest, store
from medsass.errors import StoreError
from medsass.store import StoreInfo

from .inspect_store import manifest_counts
from .output import BuildJob
from .plan import PlanEntry
from .shards import part_path
from .store_polarity import StoreVote

PACKAGES = ("numpy", "zarr", "numcodecs", "dask", "distributed", "scikit-image", "pydicom", "tifffile", "imagecodecs",
            "pillow", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle")


def assemble(job: BuildJob, entries: Sequence[PlanEntry], info: StoreInfo, vote: StoreVote | None = None) -> dict:
    """Write the manifest and the summary of a store whose shards are all finished; returns the summary. ``vote``
    (``--polarity store``) goes into the summary and the store's attributes as ``polarity_vote``."""
    by_source: dict[str, list[dict]] = {}
    for s in range(info.n_shards):
        p = part_path(job.out, s)
        if not p.exists():
            raise StoreError(f"shard {s} of {job.out} is not finished; re-run the same command to finish it")
        for r in manifest.read_rows_jsonl(p):
            by_source.setdefault(r["source"], []).append(r)
    rows = []
    for e in entries:
        if e.row_start < 0:
            rows.append(_plan_row(e))
        else:
            got = by_source.get(e.source, [])
            rows += _dedupe_failed(sorted(got, key=lambda r: (r["row"] if r["row"] >= 0 else 1 << 62, r["frame"])))
    table = manifest.rows_to_table(rows)
    manifest.write_table(table, manifest.manifest_path(job.out))
    summary = build_summary(table, job, info)
    if vote is not None:
        summary["polarity_vote"] = vote.as_dict(with_sample=False)
        _record_vote(job, vote)
    manifest.write_json(summary, manifest.summary_path(job.out))
    store.consolidate(job.out)
    return summary


def _record_vote(job: BuildJob, vote: StoreVote) -> None:
    """The store's polarity and its vote counts in the group's medsass attributes (the sample list stays in
    ``_medsass/polarity_vote.json``: it names files)."""
    group, _ = store.open_store(job.out, mode="r+")
    meta = dict(group.attrs[store.ATTRS_KEY])
    meta["polarity_vote"] = vote.as_dict(with_sample=False)
    group.attrs[store.ATTRS_KEY] = meta


def _plan_row(e: PlanEntry) -> dict:
    """The manifest row of an input that failed or was skipped at planning (it has no rows)."""
    return manifest.empty_row(
        sample_id=e.sample_base, source=e.source, source_rel=e.rel, source_bytes=e.size_bytes, format=e.format,
        n_frames=e.n_frames, status=e.status, reason_code=e.reason_code, reason=e.reason,
        orig_height=e.height, orig_width=e.width, photometric=e.photometric, modality=e.modality,
    )


def _dedupe_failed(rows: list[dict]) -> list[dict]:
    """A multi-frame file straddling two shards may report the same failed frame twice."""
    seen, out = set(), []
    for r in rows:
        key = (r["sample_id"], r["status"]) if r["status"] != "ok" else (r["row"],)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_summary(table: pa.Table, job: BuildJob, info: StoreInfo) -> dict:
    counts = manifest_counts(table.to_pandas())
    return {
        "schema_version": manifest.SCHEMA_VERSION,
        "created_with": f"medsass {__version__}",
        "params": job.params,
        "params_digest": job.cfg.params_digest(),
        "packages": package_versions(),
        "store": {"size": info.size, "n_records": info.n_records, "shard_records": info.shard_records,
                  "n_shards": info.n_shards},
        **counts,
    }


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for n in PACKAGES:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = ""
    return out
