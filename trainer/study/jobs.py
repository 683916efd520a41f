"""The study's grid: which runs exist, in which order, and what identifies each one.

Three kinds of job, per dataset and seed:

* ``pretrain`` (per pseudo-mask target): the U-Net pretrained on the pseudo-masks of the pool (every non-test
  record); scored on the test split and on every site without fine-tuning (``zero_shot``), next to the stored
  pseudo-masks themselves (``floor``).
* ``ssl``: the encoder pretrained with SimCLR on the same pool, for the same number of steps.
* ``finetune`` (per arm and label count): fine-tune on ``n`` labeled train images, keep the checkpoint with the
  best val IoU, score it on the test split and on every site.
* with the study's ``init_weights`` (optional): the ``weights`` arm fine-tunes from them; ``weights_pretrain`` pretrains
  them end to end on the main target's pseudo-masks and the ``weights_end_to_end`` arm fine-tunes from that. Their
  keys hold the weight name or the file's sha256; they live under ``runs/<dataset>/weights-<name>/``.

The arms of one seed are paired: the trainer draws the label subset, the initial weights, the batch order and the
augmentation from the run's seed, which is the same for every arm. A job's ``key`` hashes what its result depends
on (schedule, model, data identity, the key of the pretrain job it starts from), not where files are, so the
ledger in ``results_dir`` stays valid when the study moves to another machine or folder.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medsass.trainer import weights
from medsass.trainer.config import FinetuneConfig, load_config
from medsass.trainer.study.ledger import same_realizations
from medsass.trainer.study.spec import (PSEUDO_ARMS, WEIGHT_ARMS, RecipeSpec, Study, budget_count, budget_counts,
                                        parse_budget, recipe_train)

from medsass import configio
from medsass.errors import MedsassError
from medsass.manifest import file_digest

# Run order: the main comparison (the convergence check first, since it decides whether the schedule is long enough;
# then pretraining, scratch and end-to-end) seed by seed; then the SSL baseline, encoder-only and the other targets.
TIER = {"convergence": 0, "pretrain": 1, "scratch": 2, "end_to_end": 3, "ssl_pretrain": 4, "ssl": 5, "strategy": 6,
        "encoder_only": 7, "other_target": 8, "weights": 9, "weights_pretrain": 10, "weights_end_to_end": 11, "recipe": 12}


def _priority(tier: str, seed: int, *rest: int) -> tuple:
    t = TIER[tier]
    return (0, seed, t, *rest) if t <= TIER["end_to_end"] else (1, t, seed, *rest)


@dataclass
class StudyData:
    """The stores of one dataset: target -> store path, and site -> store path."""

    name: str
    stores: dict[str, str]
    sites: dict[str, str]
    site_splits: dict[str, list[str]]
    n_labeled_train: int
    digests: dict[str, str] = field(default_factory=dict)  # target -> stores.data_digest (part of every job key)
    pool_extra: dict[str, dict[str, str]] = field(default_factory=dict)  # target -> more stores pretrained on (weight 1)

    @property
    def main_target(self) -> str:
        return next(iter(self.stores))


@dataclass
class Job:
    kind: str  # pretrain | ssl | finetune
    dataset: str
    target: str  # pseudo-mask method (scratch / ssl: the main target's store, no pseudo-masks used)
    arm: str  # pretrain | ssl_pretrain | scratch | end_to_end | encoder_only | ssl
    seed: int
    dir: str
    config: dict[str, Any]  # full trainer config data
    identity: dict[str, Any]  # what the result depends on (hashed into key)
    n_labels: int = 0
    budgets: list[str] = field(default_factory=list)
    steps_factor: int = 1  # > 1: a convergence-check run
    strategy: str | None = None  # labeled images chosen by ``medsass-train suggest`` with this strategy
    recipe: str | None = None  # the arm fine-tuned with this recipe's finetune keys (the study's ``recipes``)
    needs: str | None = None  # key of the job this one starts from
    sites: dict[str, str] = field(default_factory=dict)
    site_splits: dict[str, list[str]] = field(default_factory=dict)
    priority: tuple = ()
    init_weights: str | dict[str, str] | None = None  # the study's init_weights as in the key (a file: its sha256)
    realization: int = 0  # > 0: an adopted rerun of a pretraining that did not reproduce its ledger row (adopt_reruns)
    partner_of: tuple[str, ...] = ()  # the runs moved to an adopted rerun that this run, run again from it, pairs with
    # (recipe, steps_factor) under which the same work is also reported: a run of the grid that another part of the
    # study asks for too (e.g. a recipe of 2x the steps, and the convergence check's 2x-steps run), run once
    aliases: list[tuple[str | None, int]] = field(default_factory=list)
    # a teacher recipe's run: {"config": the arm's plain fine-tune (out_dir <dir>/teacher), "key": that run's key in
    # the grid, "store": the store copied to config.stores.main (<dir>/pool.zarr) before the teacher's labels go in}
    teacher: dict[str, Any] | None = None
    # a relabel recipe's run: {"dir": the folder shared by the runs of one start (<start>/relabel), "source": the start's
    # checkpoint that re-labels the pool, "store": the store copied to <dir>/pool.zarr before the labels go in,
    # "config": the pretraining on those labels (out_dir <dir>), "rule": the re-labelling rule (train.selftrain)}
    relabel: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return _digest(self.identity, self.realization)[:16]

    @property
    def names(self) -> list[tuple[str | None, int]]:
        """(recipe, steps_factor) of every part of the study this run is reported under: its own, then ``aliases``."""
        return [(self.recipe, self.steps_factor), *self.aliases]

    @property
    def label(self) -> str:
        extra = f" n={self.n_labels}" if self.kind == "finetune" else ""
        extra += f" (rerun {self.realization})" if self.realization else ""
        extra += f" x{self.steps_factor} steps" if self.steps_factor > 1 else ""
        extra += f" picked by {self.strategy}" if self.strategy else ""
        extra += f" recipe {self.recipe}" if self.recipe else ""
        return f"{self.dataset} {self.target} {self.arm} seed{self.seed}{extra}"


def run_config(train: dict[str, Any], store: str, out_dir: Path, seed: int) -> dict[str, Any]:
    cfg = copy.deepcopy(train)
    cfg.update(out_dir=str(out_dir), stores={"main": store}, seed=seed)
    for section in ("pretrain", "finetune", "evaluate", "runtime"):
        cfg.setdefault(section, {})
    cfg["pretrain"]["splits"] = ["train", "val"]  # the pool: every non-test record, labels unused
    # off in every fine-tune (the trajectory is the same either way): the report derives the keep_start arm from
    # the pretrainings' val scores, and the end-to-end arm stays the fine-tuned model
    cfg["finetune"]["keep_start"] = False
    return cfg


def _identity(cfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data = {k: v for k, v in cfg.items() if k not in ("runtime", "out_dir", "stores")}
    data["finetune"] = {k: v for k, v in data.get("finetune", {}).items() if k not in ("pretrained", "labeled_ids", "keep_start")}
    return {**data, **extra}


@dataclass(frozen=True)
class InitWeights:
    """The study's ``init_weights``, as the runs' configs, the job keys and the folders use it."""

    spec: str  # the runs' model.encoder_weights: a weight name or an absolute file path
    ident: str | dict[str, str]  # in job keys: the name, or the file's sha256 (not where the file is)
    slug: str  # runs/<dataset>/<slug>/: weights-imagenet, weights-<file stem>-<sha256[:8]>


def init_weights(study: Study) -> InitWeights | None:
    spec = study.init_weights
    if not spec:
        return None
    if not weights.is_file(spec):
        return InitWeights(spec, spec, f"weights-{spec}")
    digest = file_digest(spec)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).stem)
    return InitWeights(spec, {"sha256": digest}, f"weights-{stem}-{digest[:8]}")


def _with_weights(cfg: dict[str, Any], w: InitWeights) -> dict[str, Any]:
    """``cfg`` whose first stage starts from the study's init_weights."""
    cfg["model"] = {**cfg.get("model", {}), "encoder_weights": w.spec}
    return cfg


def _weights_identity(ident: dict[str, Any], w: InitWeights) -> dict[str, Any]:
    return {**ident, "model": {**ident["model"], "encoder_weights": w.ident}}


WEIGHTS_PRE = "::weights"  # the key of the init_weights pretrain job among a seed's pretrain jobs


def _weights_pretrain_job(train, d: StudyData, seed: int, w: InitWeights, runs: Path, data_id, d_i: int) -> Job:
    """The init_weights pretrained end to end on the main target's pseudo-masks (scored zero-shot, as the others)."""
    base = runs / d.name / w.slug / d.main_target / f"seed{seed}"
    cfg = _with_weights(run_config(train, d.stores[d.main_target], base, seed), w)
    cfg["evaluate"]["checkpoint"] = "pretrain"
    ident = _weights_identity(_identity({k: v for k, v in cfg.items() if k != "finetune"}, kind="pretrain",
                                        data=data_id(d.main_target)), w)
    return Job("pretrain", d.name, d.main_target, "weights_pretrain", seed, str(base), cfg, ident, sites=d.sites,
               site_splits=d.site_splits, priority=_priority("weights_pretrain", seed, d_i, 0), init_weights=w.ident)


PSEUDO_ONLY_KEYS = ("threshold.polarity", "threshold.method")  # prep keys that change the pseudo-masks only


def make_jobs(study: Study, train: dict[str, Any], data: list[StudyData]) -> list[Job]:
    """Every job of the study, deduplicated, in run order (see ``TIER``: the main comparison first, seed by seed)."""
    jobs: list[Job] = []
    runs = Path(study.out_dir) / "runs"
    prep = configio.to_dict(study.prep)
    # prep overrides of the pseudo-masks' side and method (e.g. threshold.polarity=auto, pinned when the prep default
    # changed) stay out of the keys: they change only the pseudo-masks, which are in the target's data digest
    # (stores.data_digest), and runs that never read pseudo-masks (scratch, SimCLR) do not depend on them. Other
    # threshold keys (intensity, window) change the stored images too, which the digests do not see: they stay in.
    prep["overrides"] = [o for o in prep["overrides"] if o.partition("=")[0].strip() not in PSEUDO_ONLY_KEYS]
    conv = study.convergence
    w = init_weights(study)
    for d_i, d in enumerate(data):
        counts = budget_counts(study.budgets, d.n_labeled_train)
        other_counts = {budget_count(b, d.n_labeled_train) for b in study.other_targets.budgets}
        conv_counts = {budget_count(b, d.n_labeled_train) for b in conv.budgets} if conv else set()
        for seed in study.seeds:
            def data_id(target: str, pseudo: bool = True) -> dict[str, Any]:
                if not pseudo:  # scratch / SimCLR read images and labels only: any target's store is the same data
                    return {"dataset": d.name, "prep": prep, "digest": d.digests["images"],
                            "sites": {k: [d.digests[f"images:site:{k}"], d.site_splits[k]] for k in sorted(d.sites)}}
                ident = {"dataset": d.name, "target": target, "prep": prep, "digest": d.digests[target],
                         "sites": {k: [d.digests.get(f"site:{k}"), d.site_splits[k]] for k in sorted(d.sites)}}
                if target in d.pool_extra:  # only pooled targets carry it: the other keys stay as they were
                    ident["pool"] = {k: d.digests.get(f"site:{k[5:]}", k) for k in sorted(d.pool_extra[target])}
                return ident

            pre: dict[str, Job] = {}
            if w and "weights_end_to_end" in study.arms:
                pre[WEIGHTS_PRE] = _weights_pretrain_job(train, d, seed, w, runs, data_id, d_i)
                jobs.append(pre[WEIGHTS_PRE])
            for t_i, target in enumerate(d.stores):
                arms = study.arms if t_i == 0 else study.other_targets.arms
                if not any(a in PSEUDO_ARMS for a in arms):
                    continue
                base = runs / d.name / target / f"seed{seed}"
                cfg = run_config(train, d.stores[target], base, seed)
                cfg["evaluate"]["checkpoint"] = "pretrain"
                extra = d.pool_extra.get(target, {})
                if extra:  # a pooled pretraining: every store in the pool, scored on the main store as the others
                    cfg["stores"].update(extra)
                    cfg["pretrain"]["stores"] = {n: 1.0 for n in cfg["stores"]}
                    cfg["evaluate"]["stores"] = ["main"]
                ident = _identity({k: v for k, v in cfg.items() if k != "finetune"}, kind="pretrain", data=data_id(target))
                pre[target] = Job("pretrain", d.name, target, "pretrain", seed, str(base), cfg, ident, sites=d.sites,
                                  site_splits=d.site_splits,
                                  priority=_priority("pretrain" if t_i == 0 else "other_target", seed, d_i, t_i, 0))
                jobs.append(pre[target])
            ssl_job = None
            if "ssl" in study.arms:
                base = runs / d.name / "ssl" / f"seed{seed}"
                cfg = run_config(train, d.stores[d.main_target], base, seed)
                ident = _identity({k: v for k, v in cfg.items() if k not in ("finetune", "evaluate")}, kind="ssl",
                                  ssl=configio.to_dict(study.ssl), data=data_id(d.main_target, pseudo=False))
                ssl_job = Job("ssl", d.name, d.main_target, "ssl_pretrain", seed, str(base), cfg, ident,
                              priority=_priority("ssl_pretrain", seed, d_i, 0))
                jobs.append(ssl_job)
            for n, names in sorted(counts.items()):
                plan = [(t, a, 1) for t_i, t in enumerate(d.stores) for a in (study.arms if t_i == 0 else
                        (study.other_targets.arms if n in other_counts else []))]
                if conv and n in conv_counts:
                    plan += [(d.main_target, a, conv.factor) for a in conv.arms]
                for target, arm, factor in plan:
                    jobs.append(_finetune_job(study, train, d, target, arm, seed, n, names, factor, pre, ssl_job, runs,
                                              data_id, d_i, w))
            st = study.strategies
            if st and (not st.datasets or d.name in st.datasets):
                st_counts = budget_counts(st.budgets, d.n_labeled_train)
                for target in strategy_targets(st, d):
                    if target not in pre:
                        raise MedsassError(f"strategies: {d.name}'s {target} target has no end-to-end pretraining in "
                                           "this study: add end_to_end to arms (main target) or other_targets.arms")
                    grid = (study.arms, counts) if target == d.main_target else (study.other_targets.arms, other_counts)
                    for n, names in sorted(st_counts.items()):
                        if "end_to_end" not in grid[0] or n not in grid[1]:  # the random baseline runs too
                            jobs.append(_finetune_job(study, train, d, target, "end_to_end", seed, n, names, 1, pre,
                                                      ssl_job, runs, data_id, d_i))
                        for name in st.names:
                            jobs.append(_strategy_job(study, train, d, target, seed, n, names, name, pre[target], runs,
                                                      data_id, d_i))
            for r in study.recipes:
                if r.datasets and d.name not in r.datasets:
                    continue
                r_counts = budget_counts(r.budgets, d.n_labeled_train)
                plan = [(t, a, n, names, 1) for n, names in sorted(r_counts.items())
                        for t, a in _recipe_plan(study, d, r, pre, ssl_job)]
                if conv and r.name in conv.recipes:  # the recipe's schedule checked: its run and factor x its steps
                    c_counts = budget_counts(conv.budgets, d.n_labeled_train)
                    plan += [(t, a, n, names, f) for n, names in sorted(c_counts.items()) for f in (1, conv.factor)
                             for t, a in _recipe_plan(study, d, r, pre, ssl_job)
                             if a in conv.arms and t == d.main_target and (f > 1 or n not in r_counts)]
                for target, arm, n, names, factor in plan:
                    jobs.append(_finetune_job(study, train, d, target, arm, seed, n, names, factor, pre, ssl_job, runs,
                                              data_id, d_i, w, recipe=r))
    return _dedupe(jobs)


def _recipe_plan(study: Study, d: StudyData, r: RecipeSpec, pre: dict[str, Job], ssl_job: Job | None) -> list[tuple[str, str]]:
    """The (target, arm) runs of a recipe on one dataset; an arm whose start the grid does not make is an error."""
    targets = r.targets or [d.main_target]
    unknown = [t for t in targets if t not in d.stores]
    if unknown:
        raise MedsassError(f"recipes.{r.name}.targets: {unknown} are not targets of {d.name} ({', '.join(d.stores)})")
    plan = []
    for arm in r.arms:
        for target in r.arm_targets(arm, d.main_target):
            if arm in PSEUDO_ARMS and target not in pre:
                raise MedsassError(f"recipes.{r.name}: {arm} on {d.name}'s {target} needs its pretraining, which the "
                                   "study does not run: add end_to_end to arms (main target) or other_targets.arms")
            if arm == "ssl" and ssl_job is None:
                raise MedsassError(f"recipes.{r.name}: the ssl arm needs the SimCLR pretraining: add ssl to arms")
            plan.append((target, arm))
    return plan


# the fine-tune init of arms not named after one (the others: init = arm)
ARM_INIT = {"ssl": "encoder_only", "weights": "scratch", "weights_end_to_end": "end_to_end"}


def _finetune_job(study, train, d: StudyData, target, arm, seed, n, names, factor, pre, ssl_job, runs, data_id, d_i,
                  w: InitWeights | None = None, recipe: RecipeSpec | None = None) -> Job:
    main = target == d.main_target
    joint_scratch = arm == "scratch" and recipe is not None and recipe.fits_pseudo_masks  # fits target's pseudo-masks
    if arm in ("scratch", "ssl", *WEIGHT_ARMS) and not joint_scratch:
        target = d.main_target
    source = (None if arm in ("scratch", "weights") else ssl_job if arm == "ssl" else
              pre[WEIGHTS_PRE] if arm == "weights_end_to_end" else pre[target])
    sub = f"n{n:03d}" + (f"_x{factor}" if factor > 1 else "") + (f"_{recipe.name}" if recipe else "")
    out = runs / d.name / (target if arm in PSEUDO_ARMS else arm) / f"seed{seed}" / sub / (arm if arm in PSEUDO_ARMS else "")
    if arm == "weights":
        out = runs / d.name / w.slug / f"seed{seed}" / sub
    elif joint_scratch and not main:
        out = runs / d.name / target / f"seed{seed}" / sub / arm
    elif arm == "weights_end_to_end":
        out = Path(source.dir) / sub / "end_to_end"
    cfg = run_config(recipe_train(train, recipe) if recipe else train, d.stores[target], out, seed)
    if arm == "weights":
        _with_weights(cfg, w)
    fc = cfg["finetune"]
    fc.update(init=ARM_INIT.get(arm, arm), label_count=n, label_fraction=None, subset_seed=None,
              pretrained=None if source is None else str(Path(source.dir) / "pretrain" / "final.pt"))
    if factor > 1:  # the same schedule, stretched: factor x the steps (and warm-up)
        fc["steps"] = _get_steps(recipe_train(train, recipe) if recipe else train) * factor
        fc["warmup_steps"] = int(fc.get("warmup_steps", 0)) * factor
    cfg["evaluate"]["checkpoint"] = "best"
    # a joint fine-tune (finetune.pseudo_weight > 0) reads the pool's pseudo-masks on every arm, scratch too
    reads_pseudo = arm in (*PSEUDO_ARMS, "weights_end_to_end") or float(fc.get("pseudo_weight") or 0) > 0
    teacher, extra = None, {}
    if recipe is not None and recipe.teacher:  # the pool's targets: the plain fine-tune's predictions, in a store copy
        plain = _finetune_job(study, train, d, target, arm, seed, n, names, factor, pre, ssl_job, runs, data_id, d_i, w)
        teacher = {"config": {**plain.config, "out_dir": str(out / "teacher")}, "key": plain.key, "store": cfg["stores"]["main"]}
        cfg["stores"]["main"] = str(out / TEACHER_STORE)
        cfg["pretrain"]["target"] = f"pseudo_labels/{TEACHER_LABELS}"
        extra = {"teacher": plain.key}
    relabel = None
    if recipe is not None and recipe.relabel:  # the start re-labels the pool; a fresh model pretrains on those labels
        if target in d.pool_extra:
            raise MedsassError(f"recipes.{recipe.name}.relabel: {d.name}'s {target} pretrains on several stores; re-labelling "
                               "covers one store: use it on a target of the dataset's own pool")
        shared = Path(source.dir) / RELABEL_DIR
        pre_cfg = copy.deepcopy(source.config)
        pre_cfg.update(out_dir=str(shared), stores={"main": str(shared / RELABEL_STORE)})
        pre_cfg["pretrain"]["target"] = f"pseudo_labels/{RELABEL_LABELS}"
        st = load_config({**train, "out_dir": "x", "stores": {"main": "x"}}).selftrain
        rule = {"mode": st.mode, "threshold": st.threshold, "min_fg": st.min_fg, "max_fg": st.max_fg}
        relabel = {"dir": str(shared), "source": fc["pretrained"], "store": d.stores[target], "config": pre_cfg,
                   "rule": rule}
        fc["pretrained"] = str(shared / "pretrain" / "final.pt")
        extra = {"relabel": rule}
    ident = _identity(cfg, kind="finetune", arm=arm, data=data_id(target, pseudo=reads_pseudo),
                      source=source.key if source else None, **extra)
    if arm == "weights":
        ident = _weights_identity(ident, w)
    conv = study.convergence
    if recipe:
        tier = "recipe"
    elif conv and arm in conv.arms and n in {budget_count(b, d.n_labeled_train) for b in conv.budgets} and main:
        tier = "convergence"  # both the long run and the run it checks
    else:
        tier = arm if main else "other_target"
    return Job("finetune", d.name, target, arm, seed, str(out), cfg, ident, n_labels=n, budgets=list(names),
               steps_factor=factor, needs=source.key if source else None, sites=d.sites, site_splits=d.site_splits,
               priority=_priority(tier, seed, d_i, n, factor), init_weights=w.ident if w and arm in WEIGHT_ARMS else None,
               recipe=recipe.name if recipe else None, teacher=teacher, relabel=relabel)


# a teacher recipe's run: the copy of its store that holds the teacher's labels, and their name there
TEACHER_STORE = "pool.zarr"
TEACHER_LABELS = "teacher"
# a relabel recipe's runs of one start: their shared folder in the start's, its store copy, and the labels' name
RELABEL_DIR = "relabel"
RELABEL_STORE = "pool.zarr"
RELABEL_LABELS = "relabel"


def strategy_targets(st, d: StudyData) -> list[str]:
    """The targets a dataset's strategy runs use: those of ``strategies.targets`` it has, or its main target."""
    return [t for t in st.targets if t in d.stores] or [d.main_target]


def _strategy_job(study, train, d: StudyData, target, seed, n, names, strategy, source: Job, runs, data_id, d_i) -> Job:
    out = runs / d.name / target / f"seed{seed}" / f"n{n:03d}" / f"end_to_end_{strategy}"
    cfg = run_config(train, d.stores[target], out, seed)
    cfg["finetune"].update(init="end_to_end", label_count=None, label_fraction=None, subset_seed=None,
                           labeled_ids=str(out / "suggest" / "picks.csv"),
                           pretrained=str(Path(source.dir) / "pretrain" / "final.pt"))
    cfg["evaluate"]["checkpoint"] = "best"
    ident = _identity(cfg, kind="finetune", arm="end_to_end", strategy=strategy, n=n, data=data_id(target),
                      source=source.key)
    return Job("finetune", d.name, target, "end_to_end", seed, str(out), cfg, ident, n_labels=n, budgets=list(names),
               strategy=strategy, needs=source.key, sites=d.sites, site_splits=d.site_splits,
               priority=_priority("strategy", seed, d_i, n, 1))


def adopted_reruns(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """start key -> the realization of its latest adopted rerun (ledger rows with ``rerun_of``)."""
    return {k: rs[-1] for k, rs in adopted_realizations(rows).items()}


def twin_realizations(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Adopted rerun's key -> the realization it reproduced in every compared figure (0: the original;
    :func:`ledger.same_realizations`): the runs done from that one are runs from this one."""
    return {k: int(rows[t].get("realization", 0)) for k, t in same_realizations(rows).items()}


def adopted_realizations(rows: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """start key -> the realizations of all its adopted reruns, in order (a start is adopted again when the rerun's
    checkpoint is gone on the next machine too)."""
    out: dict[str, set[int]] = {}
    for r in rows.values():
        if r.get("rerun_of"):
            out.setdefault(r["rerun_of"], set()).add(int(r["realization"]))
    return {k: sorted(v) for k, v in out.items()}


def start_from(job: Job, start: Job) -> Job:
    """``job`` started from ``start`` (an adopted rerun of the start it names): a new key, so never a ledger run's, and
    a folder of its own (``<folder>@rerun<k>``), so that the checkpoints a ledger run from the original start may have
    left in its folder are never resumed as this run's."""
    home = f"{job.dir}@rerun{start.realization}"
    config, relabel = _rehome(job.config, job.dir, home), job.relabel
    if relabel is not None:  # the shared re-labelled pretraining of the rerun: a folder of its own too
        shared = f"{relabel['dir']}@rerun{start.realization}"
        config, relabel = _rehome(config, relabel["dir"], shared), _rehome(relabel, relabel["dir"], shared)
    return replace(job, identity={**job.identity, "source": start.key}, needs=start.key, dir=home, config=config,
                   teacher=_rehome(job.teacher, job.dir, home), relabel=relabel)


def _rehome(data: Any, old: str, new: str) -> Any:
    """``data`` with every path in folder ``old`` (a string equal to it or under it) moved to folder ``new``."""
    if isinstance(data, dict):
        return {k: _rehome(v, old, new) for k, v in data.items()}
    if isinstance(data, list):
        return [_rehome(v, old, new) for v in data]
    if isinstance(data, str) and (data == old or data.startswith(old.rstrip("/") + "/")):
        return new + data[len(old.rstrip("/")):] if data != old else new
    return data


def adopt_reruns(jobs: list[Job], rows: dict[str, dict[str, Any]]) -> list[Job]:
    """The grid with the ledger's adopted reruns: each such pretraining (or SimCLR run) also as its rerun, and every
    run still to do that starts from it started from the rerun instead (its key changes); runs in the ledger keep
    the start they had. ``medsass-train study --adopt-reruns`` adopts a rerun that did not reproduce its row.

    A strategy or recipe run moved to the rerun is compared with its arm as the grid runs it (same seed, budget and
    start): where the ledger has that run only from the original start, it is run again from the rerun too (a
    *partner*), as the report pairs two runs that started from a pretraining only when they started from the same one."""
    adopted = adopted_realizations(rows)
    if not adopted:
        return jobs
    by_key = {j.key: j for j in jobs}
    starts = {k: replace(by_key[k], realization=rs[-1]) for k, rs in adopted.items() if k in by_key}
    # a start adopted more than once (a new machine each time): the ledger's runs from its earlier reruns keep those
    # starts (they are done, and the report pairs them), and do not move to the latest
    earlier = {k: [replace(by_key[k], realization=r) for r in rs[:-1]] for k, rs in adopted.items() if k in by_key}
    kept = {j.key: [v for e in earlier.get(j.needs or "", []) if (v := start_from(j, e)).key in rows] for j in jobs}
    done = set(rows) | {k for k, v in kept.items() if v}
    moving = [j for j in jobs if j.needs in starts and j.key not in done]
    out = [start_from(j, starts[j.needs]) if j in moving else j for j in jobs if j.key in rows or not kept[j.key]]
    out += [v for vs in kept.values() for v in vs]
    out += partner_runs(jobs, moving, starts, done, twin_realizations(rows))
    out += [s for s in (*starts.values(), *(e for es in earlier.values() for e in es)) if s.key not in by_key]
    seen: set[str] = set()
    return [j for j in out if not (j.key in seen or seen.add(j.key))]  # once each (jobs may hold some already)


def partner_runs(jobs: list[Job], moving: list[Job], starts: dict[str, Job], done: set[str],
                 twins: dict[str, int] | None = None) -> list[Job]:
    """The ledger runs (keys in ``done``) of the grid's arms that a strategy or recipe run in ``moving`` (runs to do,
    before they move to the rerun ``starts[needs]``) is compared with: same start, seed, arm and budget; each again
    from the rerun, with ``partner_of`` naming the moved runs it pairs with. ``twins``: rerun key -> the realization
    it reproduced (0: the original; :func:`twin_realizations`); a run done from that one is its partner already.
    A teacher recipe's run needs none: its teacher is that arm's run from the same start, trained inside it."""
    twins = twins or {}

    def has_twin(j: Job) -> bool:  # and its partner is not run already (a run in the ledger stays in the plan)
        start = starts[j.needs]
        r = twins.get(start.key)
        return (r is not None and start_from(j, start).key not in done
                and (r == 0 or start_from(j, replace(start, realization=r)).key in done))

    def variants(j: Job) -> tuple[str, ...]:
        if j.kind != "finetune" or j.key not in done or j.needs not in starts or j.strategy or j.recipe or has_twin(j):
            return ()
        return tuple(start_from(m, starts[m.needs]).key for m in moving
                     if m.needs == j.needs and m.seed == j.seed and m.arm == j.arm and m.steps_factor == j.steps_factor
                     and (m.strategy or m.recipe) and m.teacher is None and set(m.budgets) & set(j.budgets))

    return [replace(start_from(j, starts[j.needs]), partner_of=v) for j in jobs if (v := variants(j))]


def _get_steps(train: dict[str, Any]) -> int:
    return int(train.get("finetune", {}).get("steps", FinetuneConfig().steps))


def _digest(ident: dict[str, Any], realization: int = 0) -> str:
    ident = {**ident, "realization": realization} if realization else ident
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _work(job: Job) -> str:
    """What a job computes: its key, with the fine-tune keys at their defaults written out, so that a key left to its
    default and the same key written (``warmup_steps: 0``) are the same work. The first job of a work keeps its key."""
    ident = job.identity
    if job.kind == "finetune":
        ident = {**ident, "finetune": configio.to_dict(configio.from_dict(FinetuneConfig, ident.get("finetune", {})))}
    return _digest(ident, job.realization)


def _dedupe(jobs: list[Job]) -> list[Job]:
    """Jobs that are the same work run once: e.g. a budget of "100%" and "50" on a small set (with both budgets), or
    a recipe of 2x the fine-tune steps and the convergence check's 2x-steps run (in the first one's folder, reported
    under both: ``aliases``)."""
    unique: dict[str, Job] = {}
    for j in jobs:
        work = _work(j)
        if work in unique:
            u = unique[work]
            label = (j.recipe, j.steps_factor)
            if label != (u.recipe, u.steps_factor):
                if label not in u.aliases:
                    u.aliases.append(label)
            elif u.dir != j.dir:
                raise MedsassError(f"one run would be written to two folders: {u.dir} and {j.dir}")
            u.budgets = sorted(set(u.budgets) | set(j.budgets), key=_budget_order)
            u.priority = min(u.priority, j.priority)
        else:
            unique[work] = j
    dirs: dict[str, str] = {}
    for j in unique.values():
        if dirs.setdefault(j.dir, j.key) != j.key:
            raise MedsassError(f"two different runs would share {j.dir}")
    return sorted(unique.values(), key=lambda j: j.priority)


def _budget_order(b: str) -> tuple[int, float]:
    kind, v = parse_budget(b)
    return (0 if kind == "count" else 1, v)


def select(jobs: list[Job], *, datasets=None, seeds=None, arms=None, budgets=None, targets=None, strategies=None,
           recipes=None, max_runs: int | None = None) -> list[Job]:
    """A subset of the grid (with the pretrain jobs the chosen fine-tune jobs need).

    ``targets`` keeps runs on those pseudo-mask targets (e.g. ``fov_otsu_hull``, ``otsu``, ``fov_otsu_hull+sites``);
    ``strategies`` keeps fine-tune runs whose labeled images were picked that way (``random``: the budget's random
    subset, i.e. the main comparison); ``recipes`` keeps fine-tune runs of those recipes (``none``: the arms as the grid
    runs them; a run that is also a recipe's, ``aliases``, counts as both). The partners of the runs kept
    (:func:`adopt_reruns`) are kept with them.
    """
    def chosen_finetune(j: Job) -> bool:
        return ((not arms or j.arm in arms) and (not budgets or bool(set(j.budgets) & set(budgets)))
                and (not targets or j.target in targets) and (not strategies or (j.strategy or "random") in strategies)
                and (not recipes or any((r or "none") in recipes for r, _ in j.names)))

    keep = [j for j in jobs if (not datasets or j.dataset in datasets) and (seeds is None or j.seed in seeds)
            and (j.kind != "finetune" or chosen_finetune(j))]
    chosen = {j.key for j in keep}
    keep += [j for j in jobs if j.key not in chosen and set(j.partner_of) & chosen]  # what the chosen pair with
    needed = {j.needs for j in keep if j.kind == "finetune"}
    narrowed = arms or budgets or targets or strategies or recipes
    keep = [j for j in keep if j.kind == "finetune" or j.key in needed or not narrowed]
    return keep[:max_runs] if max_runs else keep
