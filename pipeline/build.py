"""``build-masks``: open the output, then its three phases in order: plan, shards, assemble.

=================  ===================================================================================
``output.py``      the output folder checked and prepared: params, ``--overwrite``, salt (a :class:`BuildJob`)
``plan.py``        discover -> probe headers -> pair labels -> split -> rows; ``_medsass/plan.parquet``
``shards.py``      the arrays, and one Dask task per shard, its only writer (``process.py`` per input file)
``assemble.py``    manifest + summary from the shards' parts; consolidated metadata
=================  ===================================================================================

Resumable by construction: the plan fixes every input's rows before any pixel is decoded; a shard
counts as done once its manifest part ``_medsass/parts/shard-NNNNNN.jsonl`` exists, and that part is
written only after the shard's arrays. A re-run (also after ``kill -9``) skips finished shards and
produces the same store as an uninterrupted run. Existing output is never wiped without
``--overwrite``, and a store built with other parameters is never silently mixed. What a re-run and
``--retry-failed`` redo is decided here only (:func:`_plan`, :func:`_shards_to_write`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from medsass import jsonl, store
from medsass.errors import StoreError
from medsass.store import StoreInfo

from . import plan, shards
from .assemble import assemble
from .config import BuildConfig
from .discover import check_inputs_exist
from .labels import LabelIndex
from .output import BuildJob, open_output
from .parallel import dask_client
from .plan import PlanEntry
from .store_polarity import store_vote

EXIT_OK = 0
EXIT_SOME_FAILED = 3


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


def build(cfg: BuildConfig, *, overwrite: bool = False, retry_failed: bool = False) -> BuildResult:
    """Build (or resume) the store ``cfg.out``; ``retry_failed`` also redoes the inputs that failed before."""
    clock = _Clock()
    check_inputs_exist([s.path for s in cfg.sources])  # before anything is created: a typo leaves no half-made store
    job = open_output(cfg, overwrite=overwrite, retry_failed=retry_failed)
    rt = cfg.runtime
    with dask_client(rt.workers, rt.scheduler, quiet=not rt.progress, dashboard=rt.dashboard_address) as client:
        clock.lap("cluster")
        labels = plan.label_indexes(cfg)
        entries = _plan(job, client, labels, retry_failed)
        vote = store_vote(job, client, entries)  # --polarity store: decided once, saved; None otherwise
        clock.lap("plan")
        info = shards.open_arrays(job, entries)
        todo, info = _shards_to_write(job, entries, labels, info, retry_failed)
        tasks = shards.shard_tasks(job, info, entries, todo, vote.polarity if vote else None)
        clock.restart()
        times = shards.write_shards(client, tasks, progress=rt.progress)
        clock.lap("shards")
    clock.lap("cluster_close")
    summary = assemble(job, entries, info, vote)
    clock.lap("assemble")
    _log_run(job.work, {
        "started": clock.t0, "seconds": round(time.time() - clock.t0, 3), "shard_seconds": round(clock.phases["shards"], 3),
        "phase_seconds": {k: round(v, 3) for k, v in clock.phases.items()},
        "task_wall_seconds": round(times.wall, 3), "task_cpu_seconds": round(times.cpu, 3),
        "shards_run": len(todo), "records_run": sum(t.stop - t.start for t in tasks), "counts": summary["counts"],
    })
    return BuildResult(store=job.out, counts=summary["counts"], failures=summary["failures_by_code"],
                       shards_done=len(todo), shards_total=info.n_shards)


# ----------------------------------------------------------------------------- resume and --retry-failed


def _plan(job: BuildJob, client, labels: list[LabelIndex], retry_failed: bool) -> list[PlanEntry]:
    """A new plan, or the saved one of an earlier run, whose inputs must be those found now. With --retry-failed,
    inputs that failed may have been fixed in place: they take their new size and time."""
    discovered = plan.discover_entries(job, labels)
    saved = plan.read_plan(job)
    if saved is None:
        return plan.make_plan(job, client, discovered, labels)
    changes = plan.InputChanges.between(saved, discovered)
    fixed: list[str] = []
    if retry_failed and changes.modified:
        failed = shards.failed_sources(job.out) | {e.source for e in saved if e.status == "failed"}
        fixed = [s for s in changes.modified if s in failed]
        changes.modified = [s for s in changes.modified if s not in failed]
    if changes:
        example = (changes.added or changes.gone or changes.modified)[0]
        raise StoreError(
            f"the inputs changed since {job.out} was started ({len(changes.added)} new, {len(changes.gone)} gone, "
            f"{len(changes.modified)} modified, e.g. {example}); re-run with --overwrite to rebuild, or build a new --out"
        )
    if fixed:
        plan.take_file_facts(saved, discovered, fixed)
        plan.save_plan(job, saved)
    return saved


def _shards_to_write(job: BuildJob, entries: list[PlanEntry], labels: list[LabelIndex], info: StoreInfo,
                     retry_failed: bool) -> tuple[list[int], StoreInfo]:
    """The shards without a finished manifest part. With --retry-failed also those with a failed row, and the rows
    appended for inputs that failed at planning and are readable now. Returns them and the (grown) arrays' info."""
    done = {s for s in range(info.n_shards) if shards.part_finished(job.out, s)}
    todo = {s for s in range(info.n_shards) if s not in done}
    if not retry_failed:
        return sorted(todo), info
    todo |= {s for s in done if shards.has_failed_rows(job.out, s)}
    if any(e.status == "failed" for e in entries):
        fixed = plan.reprobe_failures(job, entries, labels)
        if fixed:
            n_rows = plan.append_rows(fixed, info.n_records)
            shards.grow_arrays(job.out, n_rows)
            todo |= set(range(info.n_records // info.shard_records, store.n_shards(n_rows, info.shard_records)))
        plan.save_plan(job, entries)
    for s in todo:
        shards.part_path(job.out, s).unlink(missing_ok=True)
    return sorted(todo), store.open_store(job.out, mode="r+")[1]


# ----------------------------------------------------------------------------- timing


class _Clock:
    """Seconds per phase of one run, for ``_medsass/runs.jsonl``."""

    def __init__(self) -> None:
        self.t0 = self.last = time.time()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.time()
        self.phases[phase], self.last = now - self.last, now

    def restart(self) -> None:
        """The next phase starts now (the time since the last lap is in no phase)."""
        self.last = time.time()


def _log_run(work: Path, entry: dict) -> None:
    jsonl.append_jsonl(work / "runs.jsonl", entry)  # cuts off a line torn by a kill first


__all__ = ["EXIT_OK", "EXIT_SOME_FAILED", "BuildResult", "build"]
