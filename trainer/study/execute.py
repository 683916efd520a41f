"""Running the study's jobs: one at a time or in a process pool, each through the trainer, each recorded in the ledger.

A job whose key is in the ledger is skipped. An interrupted job resumes from its stage checkpoints on the next
call (the trainer's own resume), so an interruption loses at most the steps since the last checkpoint. A failed
job is reported with its reason and the others go on; jobs that start from its checkpoint are skipped.

The ledger alone resumes a study on another machine: where a run to do starts from a pretraining whose row is in
the ledger but whose checkpoint is gone (a new machine, a cleaned ``out_dir``), that pretraining is run again first
and must reproduce its ledger row (the same zero-shot confusion counts, or SimCLR's final loss) before anything
starts from it; a rerun that differs fails, with its dependents, so new runs never pair with a start other than the
one the ledger's runs had. Such a rerun's checkpoint stays for inspection, marked by ``unreproduced.json`` beside
it: later calls fail those dependents at once instead of starting them from it.
"""
from __future__ import annotations

import csv
import fcntl
import multiprocessing as mp
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import medsass
from medsass.trainer.config import load_config
from medsass.trainer.mask_quality import pool_agreement
from medsass.trainer.records import select_rows
from medsass.trainer.run import plan_run, run_stages
from medsass.trainer.study import ledger
from medsass.trainer.selftrain import provenance, relabel
from medsass.trainer.study.jobs import RELABEL_LABELS, TEACHER_LABELS, Job, adopted_reruns, partner_runs, start_from, twin_realizations
from medsass.trainer.study.ledger import reproduces
from medsass.trainer.study.spec import SSLSpec
from medsass.trainer.suggest import suggest

from medsass.errors import MedsassError
from medsass.manifest import file_digest, read_json, read_manifest, write_json
from medsass.metrics import micro_iou

COUNT_KEYS = ("tp", "fp", "fn")


def run_job(job: Job, ssl_spec: SSLSpec, keep_final: bool = False) -> dict[str, Any]:
    """Run one job (finished stages are skipped by the trainer) and return its ledger row."""
    teacher = _teach(job, ssl_spec, keep_final) if job.teacher is not None else None
    relabelled = _relabel(job) if job.relabel is not None else None
    cfg = load_config(job.config)
    row: dict[str, Any] = {
        "key": job.key, "kind": job.kind, "dataset": job.dataset, "target": job.target, "arm": job.arm, "seed": job.seed,
        "n_labels": job.n_labels, "budgets": job.budgets, "steps_factor": job.steps_factor, "encoder": cfg.model.encoder,
        "pretrain_steps": cfg.pretrain.steps, "finetune_steps": cfg.finetune.steps, "batch_size": cfg.finetune.batch_size,
        "medsass_version": medsass.__version__, "seconds": {},
    }
    if job.recipe:  # the finetune keys it changes are in the run's config.yaml (and the study file)
        row["recipe"] = job.recipe
    if job.init_weights is not None:  # the init_weights this run starts from (a file: its sha256), directly or via pretraining
        row["init_weights"] = job.init_weights
    if teacher is not None:
        row["teacher"] = teacher
    if relabelled is not None:
        row["relabel"] = relabelled
    t0 = time.time()
    if job.kind == "ssl":
        from medsass.trainer.study.ssl import run_ssl  # lazy: lightly (and pytorch_lightning) take ~4 s to import

        row["ssl"] = run_ssl(cfg, ssl_spec, job.dir)
        row["seconds"]["ssl"] = round(time.time() - t0, 1)
        return row
    if job.strategy:
        _suggest(job, cfg)
        row["strategy"] = job.strategy
        row["seconds"]["suggest"] = round(time.time() - t0, 1)
    if job.kind == "finetune":
        ids = _sample_ids(cfg.stores["main"])
        row["labeled_ids"] = sorted(ids[int(r)] for r in plan_run(cfg, ["finetune"])[0].rows["main"])
        if teacher is not None and teacher["labeled_ids"] != row["labeled_ids"]:
            raise MedsassError(f"{job.label}: its teacher was fine-tuned on other labeled images ({teacher['labeled_ids']}) "
                               f"than this run ({row['labeled_ids']}); the two must share them")
        train_stage = "finetune"
    else:
        train_stage = "pretrain"
    results = run_stages(cfg, [train_stage])
    row["seconds"][train_stage] = round(time.time() - t0, 1)
    row["train_metrics"] = results[train_stage].metrics
    t1 = time.time()
    run_stages(cfg, ["evaluate"])
    row["evals"] = {"test": _per_image(Path(cfg.out_dir) / "evaluate" / "per_image.csv", "test")}
    row["seconds"]["evaluate"] = round(time.time() - t1, 1)
    t2 = time.time()
    ckpt = Path(job.dir) / train_stage / ("best.pt" if job.kind == "finetune" else "final.pt")
    for site, store in job.sites.items():
        row["evals"][f"site:{site}"] = _evaluate_site(job, site, store, ckpt)
    if job.sites:
        row["seconds"]["sites"] = round(time.time() - t2, 1)
    if job.kind == "pretrain":  # the start's val IoU: what finetune.keep_start compares fine-tuned checkpoints with
        t3 = time.time()
        row["evals"]["val"] = evaluate_val(job, ckpt)
        row["seconds"]["val"] = round(time.time() - t3, 1)
    if job.kind == "finetune" and not keep_final:
        (Path(job.dir) / "finetune" / "final.pt").unlink(missing_ok=True)
    return row


def _teach(job: Job, ssl_spec: SSLSpec, keep_final: bool) -> dict[str, Any]:
    """A teacher recipe's first part: the arm's plain fine-tune (``<dir>/teacher``, resumed like any run), then a copy
    of the store whose pool records (train and val, never test) carry the teacher's predictions (p >= 0.5 of its best
    val checkpoint) as ``pseudo_labels/teacher``, which the joint fine-tune fits beside the labeled batch. The copy is
    made under a temporary name and renamed when complete, so an interruption never leaves half a set of labels.
    Returns the teacher's scores (test, sites), its labeled images, times, and its labels' IoU on the pool's
    labeled records (a measurement only)."""
    teacher = job.teacher
    tjob = replace(job, dir=teacher["config"]["out_dir"], config=teacher["config"], teacher=None, recipe=None, aliases=[])
    trow = run_job(tjob, ssl_spec, keep_final)
    pool = Path(job.config["stores"]["main"])
    t0 = time.time()
    _labelled_copy(teacher["store"], pool, Path(tjob.dir) / "finetune" / "best.pt", TEACHER_LABELS,
                   splits=job.config["pretrain"]["splits"], mode="hard", threshold=0.5)
    pool_rows = select_rows(pool, splits=job.config["pretrain"]["splits"], target=job.config["pretrain"]["target"])
    agreement = pool_agreement({"main": pool}, {"main": pool_rows}, job.config["pretrain"]["target"])
    return {"key": teacher["key"], "evals": trow["evals"], "labeled_ids": trow["labeled_ids"],
            "train_metrics": trow["train_metrics"], "seconds": {**trow["seconds"], "relabel": round(time.time() - t0, 1)},
            "pool_agreement": {k: agreement[k] for k in ("iou", "iou_per_image_mean", "n")}}


def _relabel(job: Job) -> dict[str, Any]:
    """A relabel recipe's start, made once per start (the runs of its budgets share ``job.relabel["dir"]``, one at a
    time under a lock): the start's checkpoint re-labels the pool (train and val, never test) in a copy of the store,
    written under a temporary name and renamed when complete; a fresh model is pretrained on those labels (resumed
    like any pretraining) and scored without labels on the test and val splits and the sites. Returns what
    ``relabel.json`` in the folder holds: the rule (with the threshold used), the labels' and the pseudo-masks' IoU on
    the pool's labeled records, the zero-shot scores and the seconds each part took (once, not per run)."""
    r = job.relabel
    shared = Path(r["dir"])
    shared.mkdir(parents=True, exist_ok=True)
    cfg = load_config(r["config"])
    pool, splits, target = Path(cfg.stores["main"]), list(cfg.pretrain.splits), cfg.pretrain.target
    info_path = shared / "relabel.json"
    with _exclusive(shared / ".lock"):
        source_sha = file_digest(r["source"])
        if pool.exists() and (provenance(pool, RELABEL_LABELS) or {}).get("source_sha256") != source_sha:
            raise MedsassError(f"{pool} holds labels made from another checkpoint than {r['source']} (its pretraining was "
                               f"run again since?): delete {shared} and run again")
        if info_path.exists():
            return _relabel_sites(job, shared, r["config"], read_json(info_path), info_path)
        t0 = time.time()
        _labelled_copy(r["store"], pool, r["source"], RELABEL_LABELS, splits=splits, batch_size=cfg.evaluate.batch_size,
                       **r["rule"])
        t1 = time.time()
        results = run_stages(cfg, ["pretrain"])
        t2 = time.time()
        run_stages(cfg, ["evaluate"])
        rjob = replace(job, dir=str(shared), config=r["config"], relabel=None, teacher=None)
        ckpt = shared / "pretrain" / "final.pt"
        evals = {"test": _per_image(shared / "evaluate" / "per_image.csv", "test"), "val": evaluate_val(rjob, ckpt)}
        rows = select_rows(pool, splits=splits, target=target)
        quality = {name: {k: q[k] for k in ("iou", "iou_per_image_mean", "n")}
                   for name, t in (("labels", target), ("pseudo_masks", "pseudo_mask"))
                   for q in [pool_agreement({"main": pool}, {"main": rows}, t)]}
        info = {"rule": provenance(pool, RELABEL_LABELS)["rule"], "source_sha256": source_sha, "pool_agreement": quality,
                "evals": evals, "train_metrics": results["pretrain"].metrics,
                "seconds": {"relabel": round(t1 - t0, 1), "pretrain": round(t2 - t1, 1), "evaluate": round(time.time() - t2, 1)}}
        write_json(info, info_path)
        return _relabel_sites(job, shared, r["config"], info, info_path)


def _relabel_sites(job: Job, shared: Path, config: dict[str, Any], info: dict[str, Any], info_path: Path) -> dict[str, Any]:
    """The relabel start scored without labels on each of the job's sites it has no score for yet (a start made
    before sites were scored, or a study that added a site), saved to ``relabel.json``; called under the lock."""
    missing = [site for site in job.sites if f"site:{site}" not in info["evals"]]
    if not missing:
        return info
    t0 = time.time()
    rjob = replace(job, dir=str(shared), config=config, relabel=None, teacher=None)
    for site in missing:
        info["evals"][f"site:{site}"] = _evaluate_site(rjob, site, job.sites[site], shared / "pretrain" / "final.pt")
    info["seconds"]["sites"] = round(info["seconds"].get("sites", 0.0) + time.time() - t0, 1)
    write_json(info, info_path)
    return info


def _labelled_copy(store: str | Path, pool: Path, checkpoint: str | Path, name: str, **rule: Any) -> None:
    """``pool``: a copy of ``store`` whose ``pseudo_labels/<name>`` holds ``checkpoint``'s predictions (selftrain's
    :func:`relabel` with ``rule``), written under a temporary name and renamed when complete, so an interruption
    never leaves half a set of labels; nothing is done when ``pool`` exists."""
    if pool.exists():
        return
    tmp = pool.with_name(pool.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(store, tmp)
    relabel(tmp, checkpoint, name, **rule)
    tmp.rename(pool)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the block: parallel runs wait for each other."""
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _suggest(job: Job, cfg) -> None:
    """The strategy's n picks among the labeled train records (their labels unused), from the pretrained model."""
    picks = Path(cfg.finetune.labeled_ids)
    if picks.exists():
        return
    suggest(cfg.finetune.pretrained, cfg.stores["main"], job.n_labels, picks.parent, strategy=job.strategy, seed=job.seed,
            device=cfg.runtime.device, threads=cfg.runtime.threads, pool="labeled")


def _evaluate_site(job: Job, site: str, store: str, ckpt: Path) -> dict[str, Any]:
    data = dict(job.config)
    out = Path(job.dir) / f"site_{site}"
    data.update(out_dir=str(out), stores={site: store})
    for stage in ("pretrain", "finetune"):  # only the site's store here (a pooled run names the others)
        data[stage] = {**data.get(stage, {}), "stores": {}}
    data["evaluate"] = {**data.get("evaluate", {}), "checkpoint": str(ckpt), "splits": job.site_splits[site], "overlays": 0,
                        "stores": []}
    cfg = load_config(data)
    run_stages(cfg, ["evaluate"])
    per = out / "evaluate" / "per_image.csv"
    merged: dict[str, Any] = {"ids": [], "counts": [], "floor_counts": []}
    for split in job.site_splits[site]:
        part = _per_image(per, split)
        for k in merged:
            merged[k] += part[k]
    return merged


def evaluate_val(job: Job, ckpt: Path) -> dict[str, Any]:
    """``ckpt`` scored on the val split of the job's main store (``<job dir>/val/``)."""
    data = dict(job.config)
    out = Path(job.dir) / "val"
    data["out_dir"] = str(out)
    data["evaluate"] = {**data.get("evaluate", {}), "checkpoint": str(ckpt), "splits": ["val"], "overlays": 0,
                        "stores": ["main"]}
    run_stages(load_config(data), ["evaluate"])
    return _per_image(out / "evaluate" / "per_image.csv", "val")


def _per_image(path: Path, split: str) -> dict[str, Any]:
    """The split's ids (sorted) with their model and pseudo-mask (floor) confusion counts."""
    with path.open() as fh:
        rows = sorted((r for r in csv.DictReader(fh) if r["split"] == split), key=lambda r: r["sample_id"])
    return {"ids": [r["sample_id"] for r in rows], "counts": [[int(r[k]) for k in COUNT_KEYS] for r in rows],
            "floor_counts": [_floor(r) for r in rows]}


def _floor(r: dict[str, str]) -> list[int]:
    """The stored pseudo-mask's counts against the same target (empty when evaluate scored no floor)."""
    return [int(r[f"pseudo_{k}"]) for k in COUNT_KEYS] if r.get("pseudo_tp", "") != "" else []


def _sample_ids(store: str) -> dict[int, str]:
    df = read_manifest(store)
    df = df[df["row"] >= 0]
    return {int(r): str(s) for r, s in zip(df["row"], df["sample_id"])}


def start_checkpoint(job: Job) -> Path:
    """The checkpoint that runs starting from ``job`` (a pretraining or SimCLR run) load."""
    return Path(job.dir) / "pretrain" / "final.pt"


def unreproduced_marker(job: Job) -> Path:
    """Beside a rerun's checkpoint that did not reproduce the ledger's row: runs must not start from it."""
    return Path(job.dir) / "unreproduced.json"


def _needed_starts(jobs: list[Job], done: set[str] | dict[str, Any]) -> list[Job]:
    by_key = {j.key: j for j in jobs}
    needed = {j.needs for j in jobs if j.needs and j.key not in done}
    return [by_key[k] for k in sorted(needed) if k in done and k in by_key]


def lost_starts(jobs: list[Job], done: set[str] | dict[str, Any]) -> list[Job]:
    """Runs in the ledger whose checkpoint is gone while a run still to do starts from it (they must run again)."""
    return [j for j in _needed_starts(jobs, done) if not start_checkpoint(j).exists()]


def unreproduced_starts(jobs: list[Job], done: set[str] | dict[str, Any]) -> dict[str, str]:
    """key -> why, for runs in the ledger that a run to do starts from whose checkpoint is a rerun that did not
    reproduce the ledger's row (the runs that start from them fail at once)."""
    out = {}
    for j in _needed_starts(jobs, done):
        if start_checkpoint(j).exists() and unreproduced_marker(j).exists():
            out[j.key] = read_json(unreproduced_marker(j)).get("why", "its rerun did not reproduce its ledger row")
    return out


def _worker(job: Job, ssl_spec: SSLSpec, keep_final: bool) -> tuple[dict[str, Any] | None, str | None]:
    """Pool entry point: never raises, so one failed run does not stop the study."""
    try:
        return run_job(job, ssl_spec, keep_final), None
    except Exception as exc:  # noqa: BLE001 - reported with the job, the others go on
        return None, f"{type(exc).__name__}: {exc}"


def execute(jobs: list[Job], results_dir: str, *, ssl_spec: SSLSpec, n_parallel: int = 1, keep_final: bool = False,
            adopt: bool = False, grid: list[Job] | None = None, log=print) -> tuple[int, dict[str, str]]:
    """Run the jobs whose key is not in the ledger (a job after the one it starts from); returns (ran, failures).

    ``adopt``: a rerun that does not reproduce its ledger row (or one marked so by an earlier call, which is then
    evaluated again from its kept checkpoint) is adopted instead of failed: its row is appended under a new key
    (``rerun_of``, ``realization``) and the runs to do that start from it start from it, under new keys, with the
    ledger runs of ``grid`` (default ``jobs``) that a moved strategy or recipe run pairs with (:func:`partner_runs`)."""
    rows = ledger.read_ledger(results_dir, repair=True)
    done = set(rows)
    marked = unreproduced_starts(jobs, done)
    rerun = lost_starts(jobs, done) + ([j for j in jobs if j.key in marked] if adopt else [])
    waiting = {j.key for j in rerun}  # in the ledger, but their dependents wait for the checkpoint
    todo = rerun + [j for j in jobs if j.key not in done]
    log(f"{len(jobs)} runs: {len(jobs) - len(todo) + len(rerun)} in the ledger, {len(todo) - len(rerun)} to run, "
        f"{n_parallel} at a time" + (f"; {len(rerun)} in the ledger run again first (their checkpoints are gone"
                                     f"{' or did not reproduce' if adopt and marked else ''}: "
                                     f"{', '.join(j.label for j in rerun)})" if rerun else ""))
    failed: dict[str, str] = {} if adopt else marked
    for key, why in failed.items():
        log(f"not started from {next(j.label for j in jobs if j.key == key)}: {why}")
    t0, n = time.time(), 0
    pending = list(todo)  # the reruns first

    def adopt_rerun(job: Job, row: dict[str, Any], diff: str) -> None:
        """Append the rerun as a new realization of its run and start the pending runs that need it from it."""
        base = replace(job, realization=0)
        realization = max(job.realization, adopted_reruns(rows).get(base.key, 0)) + 1
        new = replace(job, realization=realization)
        row = {**row, "key": new.key, "rerun_of": base.key, "realization": realization, "differs": diff}
        ledger.append(results_dir, row)
        rows[new.key] = row
        done.add(new.key)
        unreproduced_marker(job).unlink(missing_ok=True)
        moving = [j for j in pending if j.needs == job.key]
        pending[:] = [start_from(j, new) if j.needs == job.key else j for j in pending]
        twins = twin_realizations(rows)
        partners = [p for p in partner_runs(grid or jobs, moving, {job.key: new}, done, twins) if p.key not in done]
        pending.extend(partners)
        todo.extend(partners)
        twin = twins.get(new.key)
        log(f"[{n}/{len(todo)}] {time.time() - t0:6.0f} s  {job.label}: the rerun does not reproduce its ledger row "
            f"({diff}); adopted as rerun {realization}: the runs to do start from it (new keys), the ledger's keep theirs"
            + ("" if twin is None else f"; it reproduces {'the original' if twin == 0 else f'rerun {twin}'} (same CPU "
               "type), whose runs pair with its runs")
            + (f"; {len(partners)} of those run again from it, to pair with the runs moved to it" if partners else ""))

    def finish(job: Job, row: dict[str, Any] | None, err: str | None) -> None:
        nonlocal n
        n += 1
        if not err and job.key in waiting:
            waiting.discard(job.key)
            diff = reproduces(row, rows[job.key])
            if diff is None:
                unreproduced_marker(job).unlink(missing_ok=True)
                log(f"[{n}/{len(todo)}] {time.time() - t0:6.0f} s  {job.label}: rerun reproduces its ledger row "
                    f"({sum(row['seconds'].values()):.0f} s)")
                return
            if adopt:
                adopt_rerun(job, row, diff)
                return
            err = (f"its checkpoint was gone and the rerun does not reproduce its ledger row ({diff}), so runs "
                   f"started from it would not pair with the ledger's. The rerun's checkpoint stays in {job.dir} "
                   f"for inspection, marked by {unreproduced_marker(job).name}: nothing starts from it. Put the "
                   f"original {start_checkpoint(job).name} there (and delete the marker), or delete the run's line "
                   f"and its dependents' from {ledger.ledger_path(results_dir)} to redo them all from this one, or "
                   f"adopt it as a new start for the runs still to do (--adopt-reruns)")
            write_json({"key": job.key, "differs": diff, "why": err}, unreproduced_marker(job))
        if err:
            failed[job.key] = err
            log(f"[{n}/{len(todo)}] FAILED {job.label}: {err}")
            return
        ledger.append(results_dir, row)
        done.add(job.key)
        if job.kind != "finetune":  # redone from a rerun that did not reproduce: its checkpoint is the ledger's now
            unreproduced_marker(job).unlink(missing_ok=True)
        test = row.get("evals", {}).get("test")
        score = f"test IoU {micro_iou(test['counts']):.3f}" if test else f"{sum(row['seconds'].values()):.0f} s"
        sites = " ".join(f"{k[5:]} {micro_iou(v['counts']):.3f}" for k, v in row.get("evals", {}).items() if k.startswith("site:"))
        log(f"[{n}/{len(todo)}] {time.time() - t0:6.0f} s  {job.label}: {score} {sites} "
            f"({sum(row['seconds'].values()):.0f} s)")

    def next_ready() -> Job | None:
        for j in pending:
            if j.needs in failed:
                pending.remove(j)
                finish(j, None, "the run it starts from failed")
                return next_ready()
        return next((j for j in pending if j.needs is None or (j.needs in done and j.needs not in waiting)), None)

    if n_parallel == 1:
        while pending:
            job = next_ready()
            if job is None:
                break
            pending.remove(job)
            finish(job, *_worker(job, ssl_spec, keep_final))
        return n, failed

    running: dict[Any, Job] = {}
    with ProcessPoolExecutor(max_workers=n_parallel, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            while len(running) < n_parallel and (job := next_ready()) is not None:
                pending.remove(job)
                running[pool.submit(_worker, job, ssl_spec, keep_final)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                finish(running.pop(fut), *fut.result())
    return n, failed

