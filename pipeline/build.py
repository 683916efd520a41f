"""``build-masks``: plan the inputs, process whole shards in parallel, assemble the manifest.

Resumable by construction: the plan fixes every input's rows before any pixel is decoded; a shard
counts as done once its manifest part ``_medsass/parts/shard-NNNNNN.jsonl`` exists, and that part is
written only after the shard's arrays. A re-run (also after ``kill -9``) skips finished shards and
produces the same store as an uninterrupted run. Existing output is never wiped without
``--overwrite``, and a store built with other parameters is never silently mixed.
"""
from __future__ import annotations

import secrets
import shutil
import sys
import time
import warnings
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsass import __version__, configio, jsonl, manifest, store
from medsass.errors import InputError, MedsassWarning, StoreError, disk_full

from . import plan as planmod
from .config import BuildConfig
from .discover import check_inputs_exist
from .labels import LabelIndex
from .parallel import dask_client, run_tasks
from .plan import PlanEntry
from .splits import GroupKeys, assign_splits

EXIT_OK = 0
EXIT_SOME_FAILED = 3
PROBE_BATCH = 256


@dataclass
class BuildResult:
    store: Path
    counts: dict[str, int]
    failures: dict[str, int] = field(default_factory=dict)
    shards_done: int = 0
    shards_total: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.counts.get("failed", 0) else EXIT_OK


def effective_shard_records(n_records: int, max_records: int) -> int:
    """Shard size: ``max_records``, smaller for small stores so they still split into ~8 tasks."""
    want = max(1, -(-n_records // 8))
    return int(min(max_records, max(32, 1 << (want - 1).bit_length())))


def build(cfg: BuildConfig, *, overwrite: bool = False, retry_failed: bool = False) -> BuildResult:
    out = Path(cfg.out)
    t0 = time.time()
    check_inputs_exist([s.path for s in cfg.sources])  # before anything is created: a typo leaves no half-made store
    _prepare_output(out, cfg, overwrite)
    work = store.work_dir(out)
    added = work / "add_labels"
    if retry_failed and ((added / "history.jsonl").exists() or (added / "run" / "plan.json").exists()):
        raise StoreError(
            f"labels were added to {out} by add-labels ({added}); --retry-failed rebuilds whole shards "
            "with the build's own --labels and would drop them. Retry into a new store (build-masks --out NEW), "
            "then run add-labels on it"
        )
    salt = _salt(cfg, work)
    params = cfg.output_params()
    rt = cfg.runtime
    phases: dict[str, float] = {}
    with dask_client(rt.workers, rt.scheduler, quiet=not rt.progress, dashboard=rt.dashboard_address) as client:
        phases["cluster"] = time.time() - t0
        entries = _plan(cfg, out, salt, client, retry_failed)
        phases["plan"] = time.time() - t0 - phases["cluster"]
        group, info = _arrays(out, cfg, entries)
        todo = _shards_to_do(out, info, entries, retry_failed, client, cfg, salt)
        if retry_failed:
            entries = planmod.from_table(pq.read_table(work / planmod.PLAN_FILE))
            group, info = store.open_store(out, mode="r+")
        starts = [e.row_start for e in entries if e.row_start >= 0]
        with_rows = [e for e in entries if e.row_start >= 0]
        calls = []
        for shard in todo:
            a, b = info.shard_bounds(shard)
            lo = max(0, bisect_right(starts, a) - 1)
            hi = bisect_right(starts, b - 1)
            mine = [e for e in with_rows[lo:hi] if e.row_start < b and e.row_start + e.n_records > a]
            calls.append((str(out), shard, a, b, mine, params, rt.strict))
        t1 = time.time()
        task_wall = task_cpu = 0.0
        for _, res in run_tasks(client, build_shard, calls, desc="shards", progress=rt.progress):
            task_wall += res["wall_s"]
            task_cpu += res["cpu_s"]
        t2 = time.time()
    phases["shards"], phases["cluster_close"] = t2 - t1, time.time() - t2
    t3 = time.time()
    result = assemble(out, cfg, entries, info)
    phases["assemble"] = time.time() - t3
    _log_run(work, {"started": t0, "seconds": round(time.time() - t0, 3), "shard_seconds": round(t2 - t1, 3),
                    "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
                    "task_wall_seconds": round(task_wall, 3), "task_cpu_seconds": round(task_cpu, 3),
                    "shards_run": len(todo), "records_run": sum(c[3] - c[2] for c in calls), "counts": result.counts})
    result.shards_done, result.shards_total = len(todo), info.n_shards
    return result


# ----------------------------------------------------------------------------- output folder


def _prepare_output(out: Path, cfg: BuildConfig, overwrite: bool) -> None:
    work = store.work_dir(out)
    params_file = work / "params.json"
    if out.exists() and any(out.iterdir()):
        if not params_file.exists():
            raise StoreError(
                f"{out} exists and is not a medsass store; choose a new --out (medsass never deletes foreign data)"
            )
        old = manifest.read_json(params_file)
        if old.get("params_digest") != cfg.params_digest():
            if not overwrite:
                old_params = old.get("params", {})
                diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in configio.diff(old_params, cfg.output_params()).items())
                hint = ""
                old_method = old_params.get("threshold", {}).get("method")
                if old_method and old_method != cfg.threshold.method:  # e.g. a store made before the default changed
                    hint = f"; to resume it as it was built, add --method {old_method}"
                raise StoreError(
                    f"{out} was built with other parameters ({diff}); pass --overwrite to rebuild it, "
                    f"or choose a new --out{hint}"
                )
            shutil.rmtree(out)
        elif overwrite:
            shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    if not params_file.exists():
        manifest.write_json({"params": cfg.output_params(), "params_digest": cfg.params_digest()}, params_file)


def _salt(cfg: BuildConfig, work: Path) -> str:
    if cfg.runtime.salt:
        return cfg.runtime.salt
    path = work / "salt"
    if not path.exists():
        manifest.atomic_write_bytes(path, secrets.token_hex(16).encode(), mode=0o600)  # a secret: owner only
    return path.read_text().strip()


# ----------------------------------------------------------------------------- planning


def _plan(cfg: BuildConfig, out: Path, salt: str, client, retry_failed: bool = False) -> list[PlanEntry]:
    work = store.work_dir(out)
    plan_file = work / planmod.PLAN_FILE
    discovered = _discover(cfg, out)
    if plan_file.exists():
        entries = planmod.from_table(pq.read_table(plan_file))
        if _check_unchanged(out, entries, discovered, retry_failed):
            manifest.write_table(planmod.to_table(entries), plan_file)
        return entries
    batches = [discovered[i : i + PROBE_BATCH] for i in range(0, len(discovered), PROBE_BATCH)]
    geom = planmod.geometry_dict(cfg)
    probed: list[list[PlanEntry]] = [[] for _ in batches]
    calls = [(b, geom, salt) for b in batches]
    for i, res in run_tasks(client, planmod.probe_entries, calls, desc="headers", progress=cfg.runtime.progress):
        probed[i] = res
    entries = [e for batch in probed for e in batch]
    _pair_and_split(cfg, entries, salt)
    if cfg.runtime.strict:
        bad = [e for e in entries if e.status == "failed"]
        if bad:
            raise InputError(bad[0].source, bad[0].reason_code, bad[0].reason + " (--strict stops at the first failure)")
    planmod.allocate_rows(entries)
    manifest.write_table(planmod.to_table(entries), plan_file)
    return entries


def _check_unchanged(out: Path, entries: list[PlanEntry], discovered: list[PlanEntry], retry_failed: bool) -> bool:
    """The inputs must be those of the plan. With --retry-failed, failed files may have been fixed in place
    (their new size/time is taken; returns True when the plan changed)."""
    old = {e.source: e for e in entries}
    new = {e.source: e for e in discovered}
    added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    changed = [s for s in set(old) & set(new) if (old[s].size_bytes, old[s].mtime_ns) != (new[s].size_bytes, new[s].mtime_ns)]
    fixed: list[str] = []
    if retry_failed and changed:
        failed = _failed_sources(out) | {e.source for e in entries if e.status == "failed"}
        fixed = [s for s in changed if s in failed]
        for s in fixed:
            old[s].size_bytes, old[s].mtime_ns = new[s].size_bytes, new[s].mtime_ns
        changed = [s for s in changed if s not in failed]
    if added or gone or changed:
        example = (added or gone or changed)[0]
        raise StoreError(
            f"the inputs changed since {out} was started ({len(added)} new, {len(gone)} gone, {len(changed)} modified, "
            f"e.g. {example}); re-run with --overwrite to rebuild, or build a new --out"
        )
    return bool(fixed)


def _failed_sources(out: Path) -> set[str]:
    parts = sorted((store.work_dir(out) / "parts").glob(f"shard-*{PART_SUFFIX}"))
    return {r["source"] for p in parts for r in manifest.read_rows_jsonl(p) if r["status"] == "failed"}


def _discover(cfg: BuildConfig, out: Path) -> list[PlanEntry]:
    from .discover import discover

    indexes = [LabelIndex(s.labels) for s in cfg.sources]
    label_files = set().union(*(ix.files for ix in indexes)) if indexes else set()
    out_resolved = str(out.resolve())
    seen: set[str] = set()
    found = []
    for i, src in enumerate(cfg.sources):
        for c in discover([src.path]):
            path = str(c.path)
            if path in seen or path in label_files or path.startswith(out_resolved + "/"):
                continue
            seen.add(path)
            found.append((i, c))
    roots = sorted({str(c.root) for _, c in found})
    common = planmod.common_parent(roots)
    entries = []
    for i, c in found:
        st = c.path.stat()
        base = Path(c.path).relative_to(common).as_posix() if common and str(c.path).startswith(common) else c.rel
        entries.append(
            PlanEntry(
                source=str(c.path), root=str(c.root), rel=c.rel, sample_base=base, source_index=i,
                size_bytes=int(c.size), mtime_ns=int(st.st_mtime_ns), format=c.format or "",
            )
        )
    return entries


def _pair_and_split(cfg: BuildConfig, entries: list[PlanEntry], salt: str) -> None:
    indexes = [LabelIndex(s.labels) for s in cfg.sources]
    keys = GroupKeys(cfg.split, salt)
    pending = [e for e in entries if e.status == "pending"]
    identities = []
    for e in pending:
        p = indexes[e.source_index].pair(e.source, e.rel)
        e.label_path, e.label_status, e.label_reason = p.path, p.status, p.reason
        identities.append(keys.identity(e.sample_base, e.dicom_group or None))
    splits = assign_splits(identities, [e.n_records for e in pending], [e.label_status == "ok" for e in pending], cfg.split)
    for e, ident, s in zip(pending, identities, splits):
        e.group, e.split = keys.stored(ident), s
    for e in entries:
        e.dicom_group = ""  # the unsalted patient hash never reaches disk


# ----------------------------------------------------------------------------- arrays and shards


def _arrays(out: Path, cfg: BuildConfig, entries: list[PlanEntry]):
    n = sum(e.n_records for e in entries if e.row_start >= 0)
    if all((out / name / "zarr.json").exists() for name in store.IMAGE_ARRAYS):
        return store.open_store(out, mode="r+")
    k = effective_shard_records(n, cfg.runtime.shard_records)
    attrs = {
        "params": cfg.output_params(),
        "params_digest": cfg.params_digest(),
        "created_with": f"medsass {__version__}",
        "intensity": "uint8; 8-bit sources unchanged, others mapped linearly from [intensity_low, intensity_high] "
        "(manifest) to [0, 255] and clipped",
    }
    store.create(out, n_records=n, size=cfg.geometry.size, shard_records=k, attrs=attrs)
    return store.open_store(out, mode="r+")


PART_SUFFIX = ".jsonl"


def part_path(out: Path, shard: int) -> Path:
    return store.work_dir(out) / "parts" / f"shard-{shard:06d}{PART_SUFFIX}"


def _part_finished(out: Path, shard: int) -> bool:
    """Whether the shard's manifest part exists whole. Parts are written atomically, so a torn one (a store copied
    while it was built, a damaged disk) is deleted, with a warning, and its shard written again."""
    path = part_path(out, shard)
    if not path.exists():
        return False
    if jsonl.ends_complete(path):
        return True
    warnings.warn(f"{path}: the manifest part of shard {shard} is torn (its last line is cut off); the shard is "
                  "written again", MedsassWarning, stacklevel=2)
    path.unlink()
    return False


def _shards_to_do(out, info, entries, retry_failed, client, cfg, salt) -> list[int]:
    done = {s for s in range(info.n_shards) if _part_finished(out, s)}
    todo = [s for s in range(info.n_shards) if s not in done]
    if not retry_failed:
        return todo
    redo = set(todo)
    for s in done:
        if any(r["status"] == "failed" for r in manifest.read_rows_jsonl(part_path(out, s))):
            redo.add(s)
    redo |= _retry_plan_failures(out, info, entries, client, cfg, salt)
    for s in redo:
        part_path(out, s).unlink(missing_ok=True)
    return sorted(redo)


def _retry_plan_failures(out, info, entries, client, cfg, salt) -> set[int]:
    """Re-probe inputs that failed at the header stage; newly readable ones get rows appended at the end."""
    failed = [e for e in entries if e.status == "failed"]
    if not failed:
        return set()
    from .discover import sniff

    for e in failed:
        e.status, e.reason_code, e.reason = "pending", "", ""
        try:
            e.format = sniff(Path(e.source)) or ""
        except OSError:
            e.format = ""
    res = planmod.probe_entries(failed, planmod.geometry_dict(cfg), salt)
    fixed = [e for e in res if e.status == "pending"]
    if not fixed:
        manifest.write_table(planmod.to_table(entries), store.work_dir(out) / planmod.PLAN_FILE)
        return set()
    _pair_and_split_more(cfg, entries, fixed, salt)
    row = info.n_records
    for e in fixed:
        e.row_start, row = row, row + e.n_records
    group, _ = store.open_store(out, mode="r+")
    for name in store.IMAGE_ARRAYS:
        group[name].resize((row, info.size, info.size))
    meta = dict(group.attrs[store.ATTRS_KEY])
    meta["n_records"] = row
    group.attrs[store.ATTRS_KEY] = meta
    manifest.write_table(planmod.to_table(entries), store.work_dir(out) / planmod.PLAN_FILE)
    first = info.n_records // info.shard_records
    last = -(-row // info.shard_records)
    return set(range(first, last))


def _pair_and_split_more(cfg, entries, fixed, salt) -> None:
    indexes = [LabelIndex(s.labels) for s in cfg.sources]
    keys = GroupKeys(cfg.split, salt)
    known = {e.group: e.split for e in entries if e.split}
    for e in fixed:
        p = indexes[e.source_index].pair(e.source, e.rel)
        e.label_path, e.label_status, e.label_reason = p.path, p.status, p.reason
        e.group = keys.key(e.sample_base, e.dicom_group or None)
        e.dicom_group = ""
        e.split = known.get(e.group, "train")  # a group already split keeps its split; new groups train


def build_shard(out: str, shard: int, start: int, stop: int, entries: list[PlanEntry], params: dict, strict: bool) -> dict:
    """Process and write one shard (runs in a Dask worker). Returns counts."""
    from .process import process_entry

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    group, info = store.open_store(out, mode="r+")
    s = info.size
    n = stop - start
    blocks = {name: np.zeros((n, s, s), np.uint8) for name in store.IMAGE_ARRAYS}
    rows = []
    for e in entries:
        wanted = [r for r in range(e.row_start, e.row_start + e.n_records) if start <= r < stop]
        for rec in process_entry(e, wanted, params, strict=strict):
            meta = rec.meta
            if meta["status"] == "ok":
                i = rec.row - start
                blocks[store.IMAGE][i], blocks[store.PSEUDO_MASK][i] = rec.image, rec.pseudo
                if rec.label is not None:
                    blocks[store.LABEL][i] = rec.label
                meta["shard"] = shard
            rows.append(meta)
    if not blocks[store.LABEL].any():  # no real masks in this shard: the array's fill value (0) already says so
        del blocks[store.LABEL]
    try:
        store.write_rows(group, start, blocks)
        manifest.write_rows_jsonl(rows, part_path(Path(out), shard))
    except Exception as exc:
        full = disk_full(exc, out, f"shard {shard}")
        if full is not None:
            raise full from exc
        raise
    return {"ok": sum(r["status"] == "ok" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
            "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu}


# ----------------------------------------------------------------------------- manifest


def _plan_row(e: PlanEntry) -> dict:
    return manifest.empty_row(
        sample_id=e.sample_base, source=e.source, source_rel=e.rel, source_bytes=e.size_bytes, format=e.format,
        n_frames=e.n_frames, status=e.status, reason_code=e.reason_code, reason=e.reason,
        orig_height=e.height, orig_width=e.width, photometric=e.photometric, modality=e.modality,
    )


def assemble(out: Path, cfg: BuildConfig, entries: list[PlanEntry], info) -> BuildResult:
    by_source: dict[str, list[dict]] = {}
    for s in range(info.n_shards):
        p = part_path(out, s)
        if not p.exists():
            raise StoreError(f"shard {s} of {out} is not finished; re-run the same command to finish it")
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
    manifest.write_table(table, manifest.manifest_path(out))
    summary = summarize(table, cfg, info)
    manifest.write_json(summary, manifest.summary_path(out))
    store.consolidate(out)
    return BuildResult(store=out, counts=summary["counts"], failures=summary["failures_by_code"])


def _dedupe_failed(rows: list[dict]) -> list[dict]:
    """A multi-frame file straddling two shards may report the same failed frame twice."""
    seen, out = set(), []
    for r in rows:
        key = (r["sample_id"], r["status"]) if r["status"] != "ok" else (r["row"],)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summarize(table: pa.Table, cfg: BuildConfig, info) -> dict:
    df = table.to_pandas()
    ok = df[df.status == "ok"]
    counts = {s: int((df.status == s).sum()) for s in manifest.STATUSES}
    failures = df[df.status == "failed"].groupby("reason_code").size().to_dict()
    skipped = df[df.status == "skipped"].groupby("reason_code").size().to_dict()
    return {
        "schema_version": manifest.SCHEMA_VERSION,
        "created_with": f"medsass {__version__}",
        "params": cfg.output_params(),
        "params_digest": cfg.params_digest(),
        "packages": package_versions(),
        "store": {"size": info.size, "n_records": info.n_records, "shard_records": info.shard_records,
                  "n_shards": info.n_shards},
        "counts": counts,
        "n_inputs": int(df.source.nunique()),
        "n_labeled": int(ok.has_label.sum()),
        "n_degenerate": int(ok.degenerate.sum()),
        "splits": {k: int(v) for k, v in ok.split.value_counts().sort_index().items()},
        "failures_by_code": {k: int(v) for k, v in sorted(failures.items())},
        "skipped_by_code": {k: int(v) for k, v in sorted(skipped.items())},
    }


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["numpy", "zarr", "numcodecs", "dask", "distributed", "scikit-image", "pydicom", "tifffile",
             "imagecodecs", "pillow", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle"]
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = ""
    return out


def _log_run(work: Path, entry: dict) -> None:
    jsonl.append_jsonl(work / "runs.jsonl", entry)  # cuts off a line torn by a kill first


__all__ = ["EXIT_OK", "EXIT_SOME_FAILED", "BuildResult", "assemble", "build", "build_shard"]
