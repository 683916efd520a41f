"""Label-efficiency study (the small-set study), its grid: the study file, one store per threshold method, and the
runs (one pretrain run per dataset, method and seed; one fine-tune + evaluate run per arm and label count).

A run's ``key`` hashes its trainer config without runtime settings: a finished run whose ``result.json`` holds
another key is run again. See ``label_efficiency.py`` for the study's design.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsass.trainer.study.spec import budget_count, parse_budget, train_section
from medsass.trainer.study.stores import build_store, check_same_records, labeled_train_count

from medsass import configio
from medsass.errors import ConfigError, MedsassError
from medsass.manifest import read_manifest

ARMS = ("scratch", "encoder_only", "end_to_end")


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


def prepare_stores(study: Study, spec: DatasetSpec, log=print) -> dict[str, str]:
    """method -> store path for one dataset (built once; identical rows, sample ids and splits checked)."""
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
