"""One study file end to end: stores -> grid -> jobs not yet in the ledger -> report."""
from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsass.trainer.study import ledger
from medsass.trainer.study.execute import execute, lost_starts, unreproduced_starts
from medsass.trainer.study.jobs import Job, StudyData, adopt_reruns, make_jobs, select
from medsass.trainer.study.report import write_report
from medsass.trainer.study.spec import Study, load_study
from medsass.trainer.study.stores import data_digest, dataset_stores, labeled_train_count, site_store, split_counts

from medsass.manifest import write_json


@dataclass
class StudyOutcome:
    jobs: list[Job]
    ran: int
    failed: dict[str, str]


def prepare(study: Study, datasets: Sequence[str] = (), log=print, build_missing: bool = True) -> list[StudyData]:
    """Build (or find) every store of the chosen datasets; with ``build_missing`` false, only the datasets whose stores
    are all built already."""
    out = []
    for spec in study.datasets:
        if datasets and spec.name not in datasets:
            continue
        stores = dataset_stores(study, spec, log, build_missing)
        sites = {s.name: site_store(study, s, spec.targets[0], log, build_missing) for s in spec.sites}
        if stores is None or any(v is None for v in sites.values()):
            continue
        main = next(iter(stores.values()))
        digests = {**{t: data_digest(p) for t, p in stores.items()}, **{f"site:{k}": data_digest(p) for k, p in sites.items()},
                   "images": data_digest(main, pseudo=False),
                   **{f"images:site:{k}": data_digest(p, pseudo=False) for k, p in sites.items()}}
        pool_extra = {}
        if spec.pool_sites:
            pooled = f"{spec.targets[0]}+sites"
            stores[pooled], digests[pooled] = main, digests[spec.targets[0]]
            pool_extra[pooled] = {f"site_{k}": p for k, p in sites.items()}
        out.append(StudyData(spec.name, stores, sites, {s.name: s.splits for s in spec.sites}, labeled_train_count(main),
                             digests, pool_extra))
        counts = split_counts(main)
        log(f"{spec.name}: {counts['pool']} pool records (train + val), {counts['val_labeled']} labeled val, "
            f"{counts['test_labeled']} labeled test, {counts['train_labeled']} labeled train; sites: {', '.join(sites) or 'none'}")
    return out


def run_study(path: str, overrides: Sequence[str] = (), *, datasets: Sequence[str] = (), seeds: Sequence[int] | None = None,
              arms: Sequence[str] = (), budgets: Sequence[str] = (), targets: Sequence[str] = (),
              strategies: Sequence[str] = (), recipes: Sequence[str] = (), max_runs: int | None = None,
              dry_run: bool = False, report_only: bool = False, adopt: bool = False,
              log=print) -> StudyOutcome:
    study, train = load_study(path, list(overrides))
    data = prepare(study, datasets, log)
    done = ledger.read_ledger(study.results_dir)
    jobs = adopt_reruns(make_jobs(study, train, data), done)
    chosen = select(jobs, datasets=datasets, seeds=seeds, arms=arms, budgets=budgets, targets=targets,
                    strategies=strategies, recipes=recipes, max_runs=max_runs)
    if dry_run:
        rerun, unreproduced = {j.key for j in lost_starts(chosen, done)}, unreproduced_starts(chosen, done)
        note = {"rerun": "  (in the ledger; its checkpoint is gone and a run to do starts from it)",
                "unreproduced": "  (in the ledger; its checkpoint is a rerun that did not reproduce it: the runs to do "
                                "that start from it " + ("start from the rerun, adopted" if adopt else "fail") + ")"}
        for j in chosen:
            state = ("rerun" if j.key in rerun else "unreproduced" if j.key in unreproduced else
                     "done" if j.key in done else "todo")
            log(f"{state}  {j.key}  {j.label}  -> {j.dir}{note.get(state, '')}")
        return StudyOutcome(chosen, 0, {})
    ran, failed = 0, {}
    if not report_only:
        _history(study, overrides, None, {}, 0.0)  # a killed session still leaves the command it ran
        t0 = time.time()
        ran, failed = execute(chosen, study.results_dir, ssl_spec=study.ssl, n_parallel=study.jobs,
                              keep_final=study.keep_final, adopt=adopt, grid=jobs, log=log)
        _history(study, overrides, ran, failed, time.time() - t0)
        jobs = adopt_reruns(jobs, ledger.read_ledger(study.results_dir))  # with any rerun this call adopted
    if datasets:  # the report covers every dataset whose stores are built, not only the ones this call ran
        quiet = lambda *_: None  # noqa: E731
        data = prepare(study, (), quiet, build_missing=False)
        jobs = adopt_reruns(make_jobs(study, train, data), ledger.read_ledger(study.results_dir))
    built = {d.name for d in data}
    write_report(study, data, jobs, log=log, left_out=[s.name for s in study.datasets if s.name not in built])
    return StudyOutcome(chosen, ran, failed)


def compact_ledger(path: str, overrides: Sequence[str] = (), log=print) -> tuple[int, int]:
    """Rewrite the study's ledger with its repeated lists stored once (see :mod:`.ledger`); trains nothing."""
    study, _ = load_study(path, list(overrides))
    before, after = ledger.compact(study.results_dir)
    log(f"{ledger.ledger_path(study.results_dir)}: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB, every run line kept")
    return before, after


def _history(study: Study, overrides: Sequence[str], ran: int | None, failed: dict[str, str], seconds: float) -> None:
    """One line per invocation in ``<results_dir>/history.jsonl`` (the commands that made the ledger)."""
    path = Path(study.results_dir) / "history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": shlex.join(["medsass-train", *sys.argv[1:]]),
             "overrides": list(overrides), "status": "started" if ran is None else "finished"}
    if ran is not None:
        entry.update(ran=ran, failed=len(failed), seconds=round(seconds, 1))
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    if failed:
        write_json(failed, Path(study.out_dir) / "failures.json")
