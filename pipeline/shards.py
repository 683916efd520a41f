"""Phase 2 of build-masks, the shards: the store's arrays, and one task per shard, its only writer.

A task decodes the inputs of its rows (``process.process_entry``), writes the shard's blocks of every array, then
its manifest part ``_medsass/parts/shard-NNNNNN.jsonl``. The part is written after the arrays, atomically: a
shard whose part exists whole is finished, and a re-run skips it.
"""
from __future__ import annotations

import time
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsass import __version__, jsonl, manifest, store
from medsass.errors import MedsassWarning, disk_full
from medsass.store import StoreInfo

from .output import BuildJob
from .parallel import run_tasks
from .plan import PlanEntry
from .process import process_entry

PART_SUFFIX = ".jsonl"


def effective_shard_records(n_records: int, max_records: int) -> int:
    """Shard size: ``max_records``, smaller for small stores so they still split into ~8 tasks."""
    want = max(1, -(-n_records // 8))
    return int(min(max_records, max(32, 1 << (want - 1).bit_length())))


def open_arrays(job: BuildJob, entries: Sequence[PlanEntry]) -> StoreInfo:
    """The store's arrays, created for the planned rows unless an earlier run did."""
    if not all((job.out / name / "zarr.json").exists() for name in store.IMAGE_ARRAYS):
        n = sum(e.n_records for e in entries if e.row_start >= 0)
        attrs = {
            "params": job.params,
            "params_digest": job.cfg.params_digest(),
            "created_with": f"medsass {__version__}",
            "intensity": "uint8; 8-bit sources unchanged, others mapped linearly from [intensity_low, intensity_high] "
            "(manifest) to [0, 255] and clipped",
        }
        k = effective_shard_records(n, job.cfg.runtime.shard_records)
        store.create(job.out, n_records=n, size=job.cfg.geometry.size, shard_records=k, attrs=attrs)
    return store.open_store(job.out, mode="r+")[1]


def grow_arrays(out: Path, n_records: int) -> StoreInfo:
    """Resize every array to ``n_records`` rows (rows appended by --retry-failed) and record the new count."""
    group, info = store.open_store(out, mode="r+")
    for name in store.IMAGE_ARRAYS:
        group[name].resize((n_records, info.size, info.size))
    meta = dict(group.attrs[store.ATTRS_KEY])
    meta["n_records"] = n_records
    group.attrs[store.ATTRS_KEY] = meta
    return store.open_store(out, mode="r+")[1]


# ----------------------------------------------------------------------------- manifest parts: what is finished


def part_path(out: Path, shard: int) -> Path:
    return store.work_dir(out) / "parts" / f"shard-{shard:06d}{PART_SUFFIX}"


def part_finished(out: Path, shard: int) -> bool:
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


def has_failed_rows(out: Path, shard: int) -> bool:
    return any(r["status"] == "failed" for r in manifest.read_rows_jsonl(part_path(out, shard)))


def failed_sources(out: Path) -> set[str]:
    """Inputs with a failed row in any finished shard."""
    parts = sorted((store.work_dir(out) / "parts").glob(f"shard-*{PART_SUFFIX}"))
    return {r["source"] for p in parts for r in manifest.read_rows_jsonl(p) if r["status"] == "failed"}


# ----------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class ShardTask:
    """What one shard's writer needs: its rows [start, stop), the inputs that have rows there, the parameters."""

    out: str
    shard: int
    start: int
    stop: int
    entries: list[PlanEntry]
    params: dict
    strict: bool
    store_polarity: str | None = None  # --polarity store: the side the plan's vote chose (pipeline/store_polarity.py)


@dataclass
class ShardTimes:
    """Seconds the shard tasks took, summed over the workers."""

    wall: float = 0.0
    cpu: float = 0.0


def shard_tasks(job: BuildJob, info: StoreInfo, entries: Sequence[PlanEntry], shards: Sequence[int],
                store_polarity: str | None = None) -> list[ShardTask]:
    with_rows = [e for e in entries if e.row_start >= 0]  # in row order
    starts = [e.row_start for e in with_rows]
    tasks = []
    for shard in shards:
        a, b = info.shard_bounds(shard)
        lo = max(0, bisect_right(starts, a) - 1)
        hi = bisect_right(starts, b - 1)
        mine = [e for e in with_rows[lo:hi] if e.row_start < b and e.row_start + e.n_records > a]
        tasks.append(ShardTask(str(job.out), shard, a, b, mine, job.params, job.cfg.runtime.strict, store_polarity))
    return tasks


def write_shards(client, tasks: Sequence[ShardTask], *, progress: bool) -> ShardTimes:
    """Run every task on the Dask cluster (an exception in one stops the run; finished shards stay)."""
    times = ShardTimes()
    for _, res in run_tasks(client, write_shard, [(t,) for t in tasks], desc="shards", progress=progress):
        times.wall += res["wall_s"]
        times.cpu += res["cpu_s"]
    return times


def write_shard(task: ShardTask) -> dict:
    """Process and write one shard (runs in a Dask worker). Returns counts and its wall and CPU seconds."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    group, info = store.open_store(task.out, mode="r+")
    s = info.size
    start, n = task.start, task.stop - task.start
    blocks = {name: np.zeros((n, s, s), np.uint8) for name in store.IMAGE_ARRAYS}
    rows = []
    for e in task.entries:
        wanted = [r for r in range(e.row_start, e.row_start + e.n_records) if start <= r < task.stop]
        for rec in process_entry(e, wanted, task.params, strict=task.strict, store_polarity=task.store_polarity):
            meta = rec.meta
            if meta["status"] == "ok":
                i = rec.row - start
                blocks[store.IMAGE][i], blocks[store.PSEUDO_MASK][i] = rec.image, rec.pseudo
                if rec.label is not None:
                    blocks[store.LABEL][i] = rec.label
                meta["shard"] = task.shard
            rows.append(meta)
    if not blocks[store.LABEL].any():  # no real masks in this shard: the array's fill value (0) already says so
        del blocks[store.LABEL]
    try:
        store.write_rows(group, start, blocks)
        manifest.write_rows_jsonl(rows, part_path(Path(task.out), task.shard))
    except Exception as exc:
        full = disk_full(exc, task.out, f"shard {task.shard}")
        if full is not None:
            raise full from exc
        raise
    return {"ok": sum(r["status"] == "ok" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
            "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu}
