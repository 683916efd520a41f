"""Label-efficiency study (the small-set study), its runs: each job through the trainer, its rows saved in the run's
``result.json`` (a re-run reads them back), ``n_parallel`` jobs at a time, a job after the pretrain run it needs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from label_efficiency_grid import Job
from medsass.trainer.config import load_config
from medsass.trainer.run import plan_run, run_stages

from medsass.manifest import read_manifest, write_json
from medsass.store import open_store


def result_path(job: Job) -> Path:
    return Path(job.dir) / "result.json"


def cached_result(job: Job) -> list[dict[str, Any]] | None:
    p = result_path(job)
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    return data["rows"] if data.get("key") == job.key else None


def run_job(job: Job) -> list[dict[str, Any]]:
    """Run one job through the trainer (finished stages are skipped) and write its ``result.json``."""
    t0 = time.time()
    cfg = load_config(job.config)
    store = cfg.stores["main"]
    df = read_manifest(store)
    ids = df[df["row"] >= 0].set_index("row")["sample_id"]
    labeled: list[str] = []
    if job.kind == "arm":  # the rows the trainer itself selects for this run
        labeled = sorted(str(ids[int(r)]) for r in plan_run(cfg, ["finetune"])[0].rows["main"])
    results = run_stages(cfg, job.stages)
    test = results["evaluate"].metrics["test"]
    per_image = Path(cfg.out_dir) / "evaluate" / "per_image.csv"
    with per_image.open() as fh:
        test_ids = sorted(r["sample_id"] for r in csv.DictReader(fh) if r["split"] == "test")
    common = {
        "dataset": job.dataset, "target": job.target, "seed": job.seed, "n_labeled_train": job.n_labeled_train,
        "n_test": test["n"], "test_digest": _digest(test_ids), "encoder": cfg.model.encoder,
        "size": int(_store_size(store)), "pretrain_steps": cfg.pretrain.steps if job.arm != "scratch" else 0,
        "finetune_steps": cfg.finetune.steps if job.kind == "arm" else 0, "batch_size": cfg.finetune.batch_size,
        "seconds": round(time.time() - t0, 1), "run_dir": job.dir,
    }
    scores = {k: test[k] for k in ("iou", "iou_per_image_mean", "dice", "dice_per_image_mean")}
    if job.kind == "pretrain":
        floor = test["otsu_floor"]
        rows = [
            {**common, "arm": "zero_shot", "budget": "0", "n_labels": 0, **scores},
            {**common, "arm": "otsu_floor", "budget": "0", "n_labels": 0, "iou": floor["iou"],
             "iou_per_image_mean": floor["iou_per_image_mean"], "dice": floor["dice"], "dice_per_image_mean": "",
             "pretrain_steps": 0, "seconds": 0.0},
        ]
    else:
        rows = [{**common, "arm": job.arm, "budget": job.budget, "n_labels": job.n_labels, **scores,
                 "labeled_digest": _digest(labeled), "labeled_ids": " ".join(labeled)}]
    write_json({"key": job.key, "rows": rows, "test_ids": test_ids, "labeled_ids": labeled}, result_path(job))
    return rows


def _store_size(store: str) -> int:
    return open_store(store)[1].size


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12]


def _job_worker(job: Job) -> tuple[str, list[dict[str, Any]] | None, str | None]:
    """Pool entry point: never raises, so one failed run does not stop the study."""
    try:
        return job.dir, run_job(job), None
    except Exception as exc:  # noqa: BLE001 - reported with the job, the others go on
        return job.dir, None, f"{type(exc).__name__}: {exc}"


def execute(jobs: list[Job], n_parallel: int, log=print) -> tuple[dict[str, list[dict]], dict[str, str], int]:
    """Run the jobs not finished yet (pretrain before its arms), ``n_parallel`` at a time; resumable."""
    results: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    todo = []
    for j in jobs:
        cached = cached_result(j)
        if cached is None:
            todo.append(j)
        else:
            results[j.dir] = cached
    log(f"{len(jobs)} runs: {len(results)} finished before, {len(todo)} to run, {n_parallel} at a time")
    if not todo:
        return results, failed, 0
    t0, n_done = time.time(), 0

    def finish(job: Job, rows, err) -> None:
        nonlocal n_done
        n_done += 1
        if err:
            failed[job.dir] = err
            log(f"[{n_done}/{len(todo)}] FAILED {job.dataset} {job.target} {job.arm} seed{job.seed} n={job.n_labels}: {err}")
            return
        results[job.dir] = rows
        r = rows[0]
        log(f"[{n_done}/{len(todo)}] {time.time() - t0:6.0f} s  {job.dataset} {job.target} {r['arm']} seed{job.seed} "
            f"n={job.n_labels}: IoU {r['iou']:.3f} ({r['seconds']:.0f} s)")

    def blocked(job: Job) -> bool:
        return job.needs is not None and job.needs in failed

    def ready(job: Job) -> bool:
        return job.needs is None or job.needs in results

    pending = list(todo)
    if n_parallel == 1:
        while pending:
            job = next(j for j in pending if ready(j) or blocked(j))
            pending.remove(job)
            finish(job, None, f"its pretrain run failed ({job.needs})") if blocked(job) else finish(job, *_job_worker(job)[1:])
        return results, failed, len(todo)

    running = {}
    with ProcessPoolExecutor(max_workers=n_parallel, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            for job in [j for j in pending if blocked(j)]:
                pending.remove(job)
                finish(job, None, f"its pretrain run failed ({job.needs})")
            for job in [j for j in pending if ready(j)]:
                if len(running) >= n_parallel:
                    break
                pending.remove(job)
                running[pool.submit(_job_worker, job)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                finish(job, *fut.result()[1:])
    return results, failed, len(todo)
