"""Label-efficiency study: does pretraining a U-Net on Otsu pseudo-masks beat training from scratch on few labels?

    python benchmarks/label_efficiency.py benchmarks/studies/cpu.yaml                 # run (resumable), then report
    python benchmarks/label_efficiency.py benchmarks/studies/cpu.yaml --report-only   # tables + plot from finished runs
    python benchmarks/label_efficiency.py STUDY --datasets ph2_dermoscopy --seeds 0 --set train.pretrain.steps=4
    python benchmarks/label_efficiency.py STUDY --dry-run                             # list the runs, train nothing
    python benchmarks/label_efficiency.py compare A/results.csv B/results.csv [ARM]   # paired a - b across studies

What runs, per dataset of the study (a dataset file from data_manifests/ or an existing store):

* **prep**: one store per threshold method (``threshold.method``), built once (skipped when finished) with a fixed
  ``runtime.salt``, so every store of a dataset has the same rows, sample ids and grouped splits (checked).
* per seed and method, one **pretrain** run on the pseudo-masks of the train split, shared by every budget; its
  final checkpoint is evaluated on the labeled test split without fine-tuning (**zero-shot**), and the stored
  pseudo-masks of the same test records give the **Otsu floor**.
* per seed and label count, one fine-tune + evaluate run per **arm**: ``scratch`` (no pretraining),
  ``encoder_only`` (pretrained encoder, decoder re-initialised), ``end_to_end`` (whole pretrained U-Net).
  Budgets (``"5"`` = 5 labeled images, ``"10%"`` = a fraction) become a label count of the labeled train split;
  budgets that give the same count (tiny datasets) are run once and listed together.

The arms of one seed are paired: the trainer draws the label subset (``select_rows(label_count=n, seed=seed)``),
the initial weights (``seed_everything(seed)`` before ``build_model``; ``encoder_only`` then overwrites only the
encoder, ``end_to_end`` everything), the batch order (``ShardStream(seed=seed)``) and the augmentation
(``augment_seed(seed, step, ...)``) from the run's ``seed``, which is the same for all arms; the runner records
the labeled sample ids and the test ids of every run so the pairing can be checked from the results.

Outputs: ``<results_dir>/results.csv`` (one row per run), ``table.md`` (mean ± std over seeds, and the paired
per-seed difference of each arm against scratch), ``plot.png``. Runs and stores go to ``<out_dir>`` (git-ignored).
Re-running skips finished runs (``result.json`` beside each run; the trainer also skips finished stages).
Relative paths in a study file are relative to the study file's folder.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsass.trainer.study.spec import budget_count, parse_budget, train_section  # noqa: F401 (the one definition; tests use le.*)
from medsass.trainer.study.stores import build_store, check_same_records, labeled_train_count

from medsass import configio
from medsass.errors import ConfigError, MedsassError

ARMS = ("scratch", "encoder_only", "end_to_end")
ARM_LABELS = {"scratch": "scratch", "encoder_only": "encoder-only", "end_to_end": "end-to-end",
              "zero_shot": "zero-shot (no labels)", "otsu_floor": "Otsu floor"}
CSV_COLUMNS = [
    "dataset", "target", "arm", "budget", "n_labels", "n_labeled_train", "seed", "iou", "iou_per_image_mean", "dice",
    "dice_per_image_mean", "n_test", "test_digest", "labeled_digest", "labeled_ids", "encoder", "size",
    "pretrain_steps", "finetune_steps", "batch_size", "seconds", "run_dir",
]


# ----------------------------------------------------------------------------- the study file


@dataclass
class DatasetSpec:
    name: str
    dataset: str | None = None  # a dataset file (data_manifests/NAME.yaml); one store is built per method
    store: str | None = None  # or an existing store (its own pseudo-masks; methods are then ignored)
    methods: list[str] = field(default_factory=lambda: ["otsu"])  # first: the main target; others: method comparison

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.store is None):
            raise ValueError(f"dataset {self.name!r}: give exactly one of dataset (a dataset file) or store")
        if not self.methods:
            raise ValueError(f"dataset {self.name!r}: methods must name at least one threshold method")


@dataclass
class PrepSpec:
    size: int = 128  # stored image size (a multiple of 32)
    salt: str = "medsass-label-efficiency"  # fixed, so the grouped splits are identical across a dataset's stores
    workers: int = 1  # Dask workers for prep
    overrides: list[str] = field(default_factory=list)  # more dataset-file keys, e.g. geometry.resize=pad


@dataclass
class Study:
    out_dir: str  # stores and runs (large; git-ignored)
    results_dir: str  # results.csv, table.md, plot.png
    datasets: list[DatasetSpec]
    train: dict[str, Any]  # a trainer config without out_dir/stores (``base: cpu_small`` allowed)
    name: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[str] = field(default_factory=lambda: ["1", "2", "5", "10%", "100%"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    method_budgets: list[str] = field(default_factory=lambda: ["2", "10%"])  # budgets of the other methods
    method_arms: list[str] = field(default_factory=lambda: ["end_to_end"])  # arms of the other methods
    method_seeds: list[int] | None = None  # seeds of the other methods; null = seeds
    prep: PrepSpec = field(default_factory=PrepSpec)
    jobs: int = 1  # training runs in parallel (processes); each uses train.runtime.threads threads
    pretrain_from: str | None = None  # another study's out_dir: fine-tune from its pretrain runs (no pretraining here)

    def __post_init__(self) -> None:
        for b in self.budgets + self.method_budgets:
            parse_budget(b)
        bad = [a for a in self.arms + self.method_arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; arms are {', '.join(ARMS)}")
        if "scratch" in self.method_arms:
            raise ValueError("method_arms must not hold scratch: scratch uses no pseudo-masks (it is shared)")
        if self.jobs < 1 or not self.seeds:
            raise ValueError("jobs must be >= 1 and seeds non-empty")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique: {names}")


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[Study, dict[str, Any]]:
    """The study and its merged trainer config data (``train.base`` resolved); paths made absolute."""
    path = Path(path).resolve()
    study = configio.load(Study, configio.read_yaml(path), list(overrides))
    base = path.parent

    def res(p: str | None) -> str | None:
        return None if p is None else str((base / p).resolve()) if not Path(p).is_absolute() else p

    study.out_dir, study.results_dir, study.pretrain_from = res(study.out_dir), res(study.results_dir), res(study.pretrain_from)
    for d in study.datasets:
        d.dataset, d.store = res(d.dataset), res(d.store)
    return study, train_section(study.train, base)


# ----------------------------------------------------------------------------- prep


def prepare_stores(study: Study, spec: DatasetSpec, log=print) -> dict[str, str]:
    """method -> store path for one dataset (built once; identical rows, sample ids and splits checked)."""
    from medsass.manifest import read_manifest

    if spec.store is not None:
        methods = sorted(set(read_manifest(spec.store)["method"].dropna().astype(str))) or ["store"]
        return {"+".join(methods): spec.store}
    stores = {m: build_store(study, spec, m, log) for m in spec.methods}
    check_same_records(stores)
    return stores


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    kind: str  # pretrain | arm
    dataset: str
    target: str  # the pseudo-mask method pretrained on (scratch: the main method's store, no pseudo-masks used)
    arm: str  # pretrain | scratch | encoder_only | end_to_end
    seed: int
    dir: str
    config: dict[str, Any]  # full trainer config data
    stages: list[str]
    n_labels: int = 0
    budget: str = ""
    n_labeled_train: int = 0
    needs: str | None = None  # dir of the pretrain job this arm starts from
    priority: tuple = ()

    @property
    def key(self) -> str:
        """Identity of the work (the trainer config without runtime settings)."""
        data = {k: v for k, v in self.config.items() if k != "runtime"}
        blob = json.dumps([self.kind, self.stages, data], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_jobs(study: Study, train: dict[str, Any], stores: dict[str, dict[str, str]]) -> list[Job]:
    """Pretrain jobs (one per dataset, method, seed) and arm jobs (one per dataset, method, seed, label count, arm)."""
    jobs: list[Job] = []
    runs = Path(study.out_dir) / "runs"
    for d_i, (ds, by_method) in enumerate(stores.items()):
        methods = list(by_method)
        main_store = by_method[methods[0]]
        n_avail = labeled_train_count(main_store)
        for seed in study.seeds:
            for m_i, method in enumerate(methods):
                main = m_i == 0
                if not main and seed not in (study.seeds if study.method_seeds is None else study.method_seeds):
                    continue
                budgets, arms = (study.budgets, study.arms) if main else (study.method_budgets, study.method_arms)
                counts: dict[int, list[str]] = defaultdict(list)
                for b in budgets:
                    counts[budget_count(b, n_avail)].append(b)
                base = runs / ds / method / f"seed{seed}"
                prio = (0 if main else 1, seed, d_i, m_i)  # the main grid first, seed by seed
                pre, source = None, base / "pretrain" / "final.pt"
                if study.pretrain_from:  # e.g. a longer fine-tune schedule on the same pretrained models
                    source = Path(study.pretrain_from) / "runs" / ds / method / f"seed{seed}" / "pretrain" / "final.pt"
                    if any(a != "scratch" for a in arms) and not source.is_file():
                        raise ConfigError(f"pretrain_from: {source} does not exist; run that study's pretraining first")
                elif any(a != "scratch" for a in arms):
                    cfg = run_config(train, by_method[method], base, seed)
                    cfg["evaluate"]["checkpoint"] = "pretrain"
                    pre = Job("pretrain", ds, method, "pretrain", seed, str(base), cfg, ["pretrain", "evaluate"],
                              n_labeled_train=n_avail, priority=prio + (0,))
                    jobs.append(pre)
                for n, names in sorted(counts.items()):
                    for arm in arms:
                        if arm == "scratch":  # no pseudo-masks: one run per (dataset, seed, n), under the dataset
                            out = runs / ds / "scratch" / f"seed{seed}" / f"n{n:03d}"
                            store = main_store
                        else:
                            out = base / f"n{n:03d}" / arm
                            store = by_method[method]
                        cfg = run_config(train, store, out, seed)
                        fc = cfg["finetune"]
                        fc.update(init=arm, label_count=n, label_fraction=None, subset_seed=None,
                                  pretrained=None if arm == "scratch" else str(source))
                        if cfg["evaluate"].get("checkpoint") == "pretrain":
                            cfg["evaluate"]["checkpoint"] = "finetune"
                        jobs.append(Job("arm", ds, methods[0] if arm == "scratch" else method, arm, seed, str(out), cfg,
                                        ["finetune", "evaluate"], n, ", ".join(names), n_avail,
                                        needs=None if pre is None or arm == "scratch" else pre.dir, priority=prio + (1, n, ARMS.index(arm))))
    unique: dict[str, Job] = {}
    for j in jobs:  # scratch runs are shared by the methods' rows of the same budget
        if j.dir in unique and unique[j.dir].key != j.key:
            raise MedsassError(f"two different runs would share {j.dir}")
        if j.dir in unique:
            merged = sorted(set(unique[j.dir].budget.split(", ")) | set(j.budget.split(", ")), key=_budget_order)
            unique[j.dir].budget = ", ".join(merged)
        else:
            unique[j.dir] = j
    return sorted(unique.values(), key=lambda j: j.priority)


def _budget_order(b: str) -> tuple[int, float]:
    kind, v = parse_budget(b)
    return (0 if kind == "count" else 1, v)


def run_config(train: dict[str, Any], store: str, out_dir: Path, seed: int) -> dict[str, Any]:
    cfg = copy.deepcopy(train)
    cfg.update(out_dir=str(out_dir), stores={"main": store}, seed=seed)
    for section in ("pretrain", "finetune", "evaluate", "runtime"):
        cfg.setdefault(section, {})
    return cfg


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
    from medsass.trainer.config import load_config
    from medsass.trainer.run import plan_run, run_stages

    from medsass.manifest import read_manifest, write_json

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
    from medsass.store import open_store

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

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

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


# ----------------------------------------------------------------------------- report


def collect(jobs: list[Job]) -> list[dict[str, Any]]:
    """The CSV rows of every finished job (in job order)."""
    rows = []
    for j in jobs:
        cached = cached_result(j)
        if cached:
            rows += cached
    return [{c: r.get(c, "") for c in CSV_COLUMNS} for r in rows]


def check_pairing(rows: list[dict[str, Any]]) -> list[str]:
    """Problems with the pairing: arms of one (dataset, seed, n) with different label subsets; different test sets."""
    problems = []
    by_ds: dict[str, set[str]] = defaultdict(set)
    subsets: dict[tuple, set[str]] = defaultdict(set)
    for r in rows:
        by_ds[r["dataset"]].add(r["test_digest"])
        if r["arm"] in ARMS:
            subsets[(r["dataset"], r["seed"], r["n_labels"])].add(r["labeled_digest"])
    problems += [f"{ds}: runs were evaluated on {len(d)} different test sets" for ds, d in by_ds.items() if len(d) > 1]
    problems += [f"{k}: arms used {len(v)} different label subsets" for k, v in subsets.items() if len(v) > 1]
    return problems


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            run_dir = Path(str(r["run_dir"]))  # relative to where the study ran (the repo root), not this machine's path
            if run_dir.is_absolute() and run_dir.is_relative_to(Path.cwd()):
                r = {**r, "run_dir": str(run_dir.relative_to(Path.cwd()))}
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k not in ("seconds",) else v) for k, v in r.items()})


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def _fmt(values: list[float], signed: bool = False) -> str:
    mean, sd, n = _stats(values)
    if n == 0:
        return "–"
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return s if n == 1 else f"{s} ± {sd:.3f}"


def _fmt_diff(diffs: list[float]) -> str:
    """Paired difference: mean ± sd over seeds, seeds with a gain; bold when it exceeds the seed spread."""
    mean, sd, n = _stats(diffs)
    if n == 0:
        return "–"
    text = f"{_fmt(diffs, signed=True)} ({sum(d > 0 for d in diffs)}/{n})"
    counts = n > 1 and abs(mean) > sd and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    return f"**{text}**" if counts else text


def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    """(dataset, target, arm, n_labels) -> seed -> micro IoU."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        out[(r["dataset"], r["target"], r["arm"], int(r["n_labels"]))][int(r["seed"])] = float(r["iou"])
    return out


def _paired(a: dict, b: dict) -> list[float]:
    """Per-seed differences a - b over the seeds both have."""
    return [a[k] - b[k] for k in sorted(a) if k in b]


def _diffs(idx, ds: str, target: str, arm: str, n: int, main_target: str) -> list[float]:
    return _paired(idx.get((ds, target, arm, n), {}), idx.get((ds, main_target, "scratch", n), {}))


def markdown(rows: list[dict[str, Any]], study: Study, header: list[str]) -> str:
    idx = _index(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = ["# Label efficiency: Otsu floor, zero-shot, scratch, encoder-only, end-to-end", "", *header, ""]
    lines += [
        "Micro IoU on the fixed, grouped test split (pixels pooled over the test images, threshold 0.5), mean ± sample "
        "std over seeds. Δ columns: the paired per-seed difference arm − scratch (same seed = same labeled images, same "
        "initial weights where not pretrained, same batch order), mean ± std over seeds, and (k/N) the seeds where the "
        "arm beat scratch. **Bold**: the difference exceeds its seed spread (|mean| > std) with all seeds on one side — "
        "the only differences we count as real. Budgets that give the same label count on a small train split are "
        "one run (listed together).", "",
    ]
    for ds in datasets:
        ds_rows = [r for r in rows if r["dataset"] == ds]
        main = next(r["target"] for r in ds_rows if r["arm"] in ("otsu_floor", "scratch"))
        any_r = ds_rows[0]
        floor = _fmt(list(idx.get((ds, main, "otsu_floor", 0), {}).values()))
        zs_by_seed = idx.get((ds, main, "zero_shot", 0), {})
        zs = list(zs_by_seed.values())
        zs_gain = _paired(zs_by_seed, idx.get((ds, main, "otsu_floor", 0), {}))
        if not zs and study.pretrain_from:  # the pretrain runs (floor, zero-shot) belong to another study
            src = Path(study.pretrain_from)
            src = src.relative_to(Path.cwd()) if src.is_relative_to(Path.cwd()) else src.name
            scores = f"Otsu floor and zero-shot: in the table of the study whose pretrain runs these are (out_dir `{src}`)."
        else:
            scores = (f"Otsu floor (pseudo-masks vs labels, test): **{floor}**. Zero-shot (pretrained U-Net, no labels): "
                      f"**{_fmt(zs)}** (vs floor {_fmt(zs_gain, signed=True)}).")
        lines += [f"## {ds}", "",
                  f"Test images: {any_r['n_test']}; labeled train images: {any_r['n_labeled_train']}; pretraining "
                  f"target: `{main}` pseudo-masks. {scores}", ""]
        arms = [a for a in ARMS if any(r["arm"] == a and r["target"] == main for r in ds_rows)]
        heads = [ARM_LABELS[a] for a in arms] + [f"Δ {ARM_LABELS[a]}" for a in arms if a != "scratch"]
        lines += ["| budget | labels | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
        ns = sorted({int(r["n_labels"]) for r in ds_rows if r["arm"] in ARMS and r["target"] == main})
        for n in ns:
            budget = next(r["budget"] for r in ds_rows if r["arm"] in ARMS and int(r["n_labels"]) == n and r["target"] == main)
            cells = [_fmt(list(idx.get((ds, main, a, n), {}).values())) for a in arms]
            cells += [_fmt_diff(_diffs(idx, ds, main, a, n, main)) for a in arms if a != "scratch"]
            lines.append(f"| {budget} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
        others = list(dict.fromkeys(r["target"] for r in ds_rows if r["target"] != main))
        if others:
            lines += [f"### {ds}: pseudo-mask method as the pretraining target", ""]
            ns_m = sorted({int(r["n_labels"]) for r in ds_rows if r["arm"] in ARMS and r["target"] in others})
            arm_m = [a for a in ARMS if any(r["arm"] == a and r["target"] in others for r in ds_rows)]
            heads = ["Otsu floor", "zero-shot"] + [f"{ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m] + \
                    [f"Δ {ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m]
            lines += ["| target | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
            for t in [main] + others:
                cells = [_fmt(list(idx.get((ds, t, "otsu_floor", 0), {}).values())),
                         _fmt(list(idx.get((ds, t, "zero_shot", 0), {}).values()))]
                cells += [_fmt(list(idx.get((ds, t, a, n), {}).values())) for n in ns_m for a in arm_m]
                cells += [_fmt_diff(_diffs(idx, ds, t, a, n, main)) for n in ns_m for a in arm_m]
                lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
            lines.append("")
            heads = [f"{ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m]
            lines += [f"Paired per-seed difference of each target against `{main}` as the target (same arm, labels, "
                      "seed):", "", "| target | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
            for t in others:
                cells = []
                for n in ns_m:
                    for a in arm_m:
                        cells.append(_fmt_diff(_paired(idx.get((ds, t, a, n), {}), idx.get((ds, main, a, n), {}))))
                lines.append(f"| `{t}` − `{main}` | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _curve(ax, idx, key: tuple[str, str, str], min_points: int, **style) -> None:
    """Mean ± std IoU over seeds against the label count for one (dataset, target, arm), if it has enough points."""
    ns = sorted(n for (*k, n) in idx if tuple(k) == key)
    if len(ns) < min_points:
        return
    st = [_stats(list(idx[(*key, n)].values())) for n in ns]
    ax.errorbar(ns, [s[0] for s in st], yerr=[0 if math.isnan(s[1]) else s[1] for s in st], ms=4, capsize=3, **style)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    cols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    colors = {"scratch": "tab:gray", "encoder_only": "tab:blue", "end_to_end": "tab:red"}
    for ax, ds in zip(axes.flat, datasets):
        main = next(r["target"] for r in rows if r["dataset"] == ds and r["arm"] in ("otsu_floor", "scratch"))
        for arm in ARMS:
            _curve(ax, idx, (ds, main, arm), 1, color=colors[arm], marker="o", label=ARM_LABELS[arm])
        others = list(dict.fromkeys(t for (d, t, a, n) in idx if d == ds and t != main and a in ARMS))
        for t_i, t in enumerate(others):  # another pretraining target over >= 3 budgets (e.g. fov_otsu_hull): dashed
            for arm in ARMS[1:]:
                _curve(ax, idx, (ds, t, arm), 3, color=colors[arm], marker="s", ls="--", alpha=0.8 - 0.2 * t_i,
                       label=f"{ARM_LABELS[arm]} ({t})")
        for arm, style, color in (("otsu_floor", "--", "black"), ("zero_shot", ":", "tab:purple")):
            vals = list(idx.get((ds, main, arm, 0), {}).values())
            if vals:
                ax.axhline(_stats(vals)[0], ls=style, color=color, lw=1.2, label=f"{ARM_LABELS[arm]} {_stats(vals)[0]:.2f}")
        ax.set_xscale("log", base=2)
        ns_all = sorted({n for (d, t, a, n) in idx if d == ds and a in ARMS})
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.minorticks_off()
        ax.set_title(f"{ds} (solid: pretrained on {main})", fontsize=10)
        ax.set_xlabel("labeled train images")
        ax.set_ylabel("test IoU (micro)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(study: Study, jobs: list[Job], header, log=print) -> list[dict[str, Any]]:
    """Write results.csv, table.md and plot.png; ``header(rows)`` gives the table's first lines."""
    rows = collect(jobs)
    if not rows:
        log("no finished runs yet: nothing to report")
        return rows
    problems = check_pairing(rows)
    if problems:
        raise MedsassError("pairing broken: " + "; ".join(problems))
    out = Path(study.results_dir)
    write_csv(rows, out / "results.csv")
    (out / "table.md").write_text(markdown(rows, study, header(rows)) + "\n")
    plot(rows, out / "plot.png")
    log(f"wrote {out / 'results.csv'} ({len(rows)} rows), {out / 'table.md'}, {out / 'plot.png'}")
    return rows


# ----------------------------------------------------------------------------- CLI


def _header(study: Study, train: dict[str, Any], command: str, history: list[dict], rows: list[dict]) -> list[str]:
    made = [h for h in history if h.get("runs_done")]
    wall = sum(h["seconds"] for h in made)
    pre, ft = train.get("pretrain", {}), train.get("finetune", {})
    runs_by = list(dict.fromkeys(h["command"] for h in made if h["command"] != command))
    if "--report-only" in command.split():
        first = (f"Runs made by: {', '.join(f'`{c}`' for c in runs_by)}; this table written by `{command}`" if runs_by
                 else f"Written by `{command}`")
    else:
        first = f"Produced by: `{command}`" + ("" if not runs_by else " (some runs made earlier by " +
                                               ", ".join(f"`{c}`" for c in runs_by) + ")")
    return [
        first,
        "",
        f"Settings: `{train.get('model', {}).get('encoder')}` U-Net, {sorted({r['size'] for r in rows})} px, pretrain {pre.get('steps')} steps, "
        f"fine-tune {ft.get('steps')} steps, batch {ft.get('batch_size')}, seeds {study.seeds}, budgets {study.budgets} "
        f"(other methods: {study.method_budgets}, seeds {study.seeds if study.method_seeds is None else study.method_seeds}). Wall time of the run invocations: {wall / 60:.0f} min.",
    ]


def compare(csv_a: str, csv_b: str, arm: str = "end_to_end") -> list[str]:
    """Paired per-seed differences a - b of ``arm`` between two results.csv (same dataset, label count, seed), e.g.
    the same arm pretrained on two targets in two studies. Rows that are not in both files are left out."""
    def load(path: str) -> dict[tuple, tuple[str, float]]:
        with open(path) as fh:
            return {(r["dataset"], int(r["n_labels"]), int(r["seed"])): (r["target"], float(r["iou"]))
                    for r in csv.DictReader(fh) if r["arm"] == arm}

    a, b = load(csv_a), load(csv_b)
    groups: dict[tuple, list[float]] = defaultdict(list)
    names: dict[tuple, tuple[str, str]] = {}
    for key in sorted(a.keys() & b.keys()):
        groups[key[:2]].append(a[key][1] - b[key][1])
        names[key[:2]] = (a[key][0], b[key][0])
    lines = [f"| dataset | labels | {arm}: target A − target B |", "|---|---:|---:|"]
    for (ds, n), diffs in groups.items():
        ta, tb = names[(ds, n)]
        lines.append(f"| {ds} | {n} | `{ta}` − `{tb}`: {_fmt_diff(diffs)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["compare"]:  # python benchmarks/label_efficiency.py compare A/results.csv B/results.csv [ARM]
        if len(argv) not in (3, 4):
            print("usage: label_efficiency.py compare A/results.csv B/results.csv [arm]", file=sys.stderr)
            return 2
        print("\n".join(compare(*argv[1:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="study YAML (benchmarks/studies/cpu.yaml)")
    ap.add_argument("--datasets", nargs="+", help="only these dataset names")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study key, e.g. train.pretrain.steps=4 or jobs=2")
    ap.add_argument("--jobs", type=int, help="runs in parallel (overrides the study's jobs)")
    ap.add_argument("--report-only", action="store_true", help="write the CSV/table/plot from finished runs only")
    ap.add_argument("--dry-run", action="store_true", help="prep the stores and list the runs; train nothing")
    args = ap.parse_args(argv)
    command = "python benchmarks/label_efficiency.py " + shlex.join(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    try:
        study, train = load_study(args.study, args.overrides)
        if args.datasets:
            unknown = set(args.datasets) - {d.name for d in study.datasets}
            if unknown:
                raise ConfigError(f"--datasets {sorted(unknown)} not in the study ({[d.name for d in study.datasets]})")
            study.datasets = [d for d in study.datasets if d.name in args.datasets]
        if args.seeds:
            study.seeds = args.seeds
            study.method_seeds = [s for s in (study.method_seeds or args.seeds) if s in args.seeds]
        from medsass.trainer.config import load_config

        load_config(run_config(train, "unused", Path(study.out_dir), 0))  # a bad train section fails now
        stores = {d.name: prepare_stores(study, d, log) for d in study.datasets}
        jobs = make_jobs(study, train, stores)
        history_file = Path(study.out_dir) / "invocations.jsonl"
        if args.dry_run:
            for j in jobs:
                log(f"{'done' if cached_result(j) else 'todo'}  {j.dataset} {j.target} {j.arm} seed{j.seed} n={j.n_labels} [{j.budget}]")
            return 0
        failed: dict[str, str] = {}
        if not args.report_only:
            _, failed, n_run = execute(jobs, args.jobs or study.jobs, log)
            history_file.parent.mkdir(parents=True, exist_ok=True)
            with history_file.open("a") as fh:
                fh.write(json.dumps({"command": command, "started": t0, "seconds": round(time.time() - t0, 1),
                                     "runs_done": n_run, "failed": len(failed)}) + "\n")
        history = [json.loads(ln) for ln in history_file.read_text().splitlines()] if history_file.exists() else []
        report(study, jobs, lambda rows: _header(study, train, command, history, rows), log)
        for d, err in failed.items():
            log(f"failed: {d}: {err}")
        log(f"total {time.time() - t0:.0f} s")
        return 1 if failed else 0
    except MedsassError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
