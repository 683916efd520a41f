"""The study's report, from the ledger alone: ``results.csv``, ``table.md`` and ``<dataset>.png`` in ``results_dir``.

Only ledger rows whose key belongs to the current grid are used (a row of an older schedule is ignored, not
mixed in). Each table cell is the seed-mean micro test IoU ± sd over seeds; each difference is paired (same
seeds, same test images) with a 95% bootstrap interval, in bold where the interval excludes zero.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from medsass.trainer.study import ledger
from medsass.trainer.study.jobs import Job, StudyData, strategy_targets, twin_realizations
from medsass.trainer.study.plot import plot_dataset, plot_strategies
from medsass.trainer.study.spec import (ARM_NAMES, PSEUDO_ARMS, WEIGHT_ARMS, Study, arm_label, budget_count, budget_counts,
                                        recipe_arm, teacher_arm)
from medsass.trainer.study.stats import MIN_SEEDS_BOLD, Estimate, estimate, micro_iou, paired_difference
from medsass.trainer.study.stores import prep_seconds

from medsass.atomic import atomic_write_bytes

CSV_COLUMNS = ["dataset", "target", "arm", "seed", "n_labels", "budgets", "steps_factor", "eval", "iou",
               "iou_per_image_mean", "n_images", "seconds_train", "seconds_evaluate", "labeled_ids", "key"]


def runs_from_ledger(rows: dict[str, dict[str, Any]], jobs: list[Job]) -> list[dict[str, Any]]:
    """One entry per (run, evaluation): pretrain rows give a floor and a zero-shot entry; SSL rows none."""
    out = []
    reruns = {j.key for j in jobs if j.realization}
    base_of = {j.key: replace(j, realization=0).key for j in jobs if j.realization}  # a rerun -> the run it reruns
    twin = ledger.same_realizations(rows)  # a rerun -> the earlier realization it reproduced: one start, for pairing
    zero_shots: set[tuple] = set()  # relabel recipes' starts already listed (the runs of one start share it)
    for job in jobs:
        row = rows.get(job.key)
        if row is None or "evals" not in row:
            continue
        common = {"dataset": job.dataset, "target": job.target, "seed": job.seed, "n_labels": job.n_labels,
                  "budgets": job.budgets, "steps_factor": job.steps_factor, "key": job.key, "seconds": row["seconds"],
                  "labeled_ids": row.get("labeled_ids", []), "start": twin.get(job.needs, job.needs),
                  "start_base": base_of.get(job.needs, job.needs), "from_rerun": job.needs in reruns}
        if job.realization:  # an adopted rerun: its runs are reported, its zero-shot scores stay the original's
            continue
        for where, ev in row["evals"].items():
            base = {**common, "eval": where, "ids": ev["ids"]}
            if job.arm == "weights_pretrain":  # the same pseudo-masks as the main pretraining: no second floor
                out.append({**base, "arm": "weights_zero_shot", "counts": np.array(ev["counts"])})
            elif job.kind == "pretrain":
                out.append({**base, "arm": "zero_shot", "counts": np.array(ev["counts"])})
                if ev["floor_counts"] and all(ev["floor_counts"]):
                    out.append({**base, "arm": "floor", "counts": np.array(ev["floor_counts"])})
            elif job.strategy:
                out.append({**base, "arm": f"strategy:{job.strategy}", "counts": np.array(ev["counts"])})
            else:  # the run, and each other part of the study that asked for the same work
                for recipe, factor in job.names:
                    out.append({**base, "arm": recipe_arm(job.arm, recipe), "steps_factor": factor,
                                "counts": np.array(ev["counts"])})
        relabelled = row.get("relabel") or {}
        for where, ev in relabelled.get("evals", {}).items():  # a relabel recipe's start, scored without labels: once
            start = (job.dataset, where, job.target, job.recipe, job.seed, job.needs)
            if where != "val" and start not in zero_shots:
                zero_shots.add(start)
                out.append({**common, "eval": where, "ids": ev["ids"], "arm": f"zero_shot+{job.recipe}", "n_labels": 0,
                            "budgets": [], "steps_factor": 1, "labeled_ids": [], "seconds": relabelled["seconds"],
                            "counts": np.array(ev["counts"]), "relabel_quality": relabelled["pool_agreement"]})
        teacher = row.get("teacher") or {}
        for where, ev in teacher.get("evals", {}).items():  # a teacher recipe's run: its teacher, trained in the run
            out.append({**common, "key": teacher["key"], "labeled_ids": teacher["labeled_ids"], "seconds": teacher["seconds"],
                        "eval": where, "ids": ev["ids"], "arm": teacher_arm(job.arm, job.recipe), "counts": np.array(ev["counts"])})
        out += [{**common, **e} for e in kept_start(row, rows.get(job.needs or ""), job)]
    return out


def kept_start(row: dict[str, Any], pre: dict[str, Any] | None, job: Job) -> list[dict[str, Any]]:
    """The ``end_to_end_kept`` arm of an end-to-end fine-tune (``end_to_end_kept+RECIPE`` of a recipe's,
    ``strategy_kept:NAME`` of a strategy's picks): what
    ``finetune.keep_start`` would have scored. The
    start (the pretrained model) is the first best.pt candidate, so it is kept when its val IoU (the pretraining row's
    val evaluation) is at least the fine-tune's best; the fine-tune's trajectory is the same either way
    (tests/trainer/test_keep_start.py), so this is the run with keep_start, without running it again."""
    if row.get("relabel"):  # a relabel recipe's run starts from the model pretrained on the re-labelled pool
        pre = row["relabel"]
    if (job.kind != "finetune" or job.arm != "end_to_end" or job.steps_factor != 1
            or pre is None or "val" not in pre.get("evals", {}) or "best_val_iou" not in row.get("train_metrics", {})):
        return []
    start_wins = micro_iou(np.array(pre["evals"]["val"]["counts"])) >= row["train_metrics"]["best_val_iou"]
    src = pre if start_wins else row
    out = []
    for where, ev in row["evals"].items():
        chosen = src["evals"].get(where)
        if chosen is None or chosen["ids"] != ev["ids"]:
            return []
        arm = f"strategy_kept:{job.strategy}" if job.strategy else recipe_arm("end_to_end_kept", job.recipe)
        out.append({"eval": where, "ids": ev["ids"], "arm": arm,
                    "counts": np.array(chosen["counts"]),
                    "start_kept": start_wins})
    return out


def _per_image_mean(counts: np.ndarray) -> float:
    c = counts.astype(np.float64)
    den = c.sum(1)
    return float(np.where(den > 0, c[:, 0] / np.maximum(den, 1), 1.0).mean())


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in runs:
        w.writerow({**{k: r.get(k, "") for k in CSV_COLUMNS}, "budgets": " ".join(r["budgets"]),
                    "iou": f"{micro_iou(r['counts']):.4f}", "iou_per_image_mean": f"{_per_image_mean(r['counts']):.4f}",
                    "n_images": len(r["counts"]), "seconds_train": r["seconds"].get("finetune", r["seconds"].get("pretrain", "")),
                    "seconds_evaluate": r["seconds"].get("evaluate", ""), "labeled_ids": " ".join(r["labeled_ids"])})
    atomic_write_bytes(path, buf.getvalue().encode())


class Index:
    """(dataset, eval, target, arm, n, factor) -> seed -> counts, with the ids they are ordered by.

    A seed may have a run from the original start and one from an adopted rerun of it (a partner, run again so that
    a variant started from the rerun has a same-start pair): the tables show the original's, the pairs take the runs
    that share a start."""

    def __init__(self, runs: list[dict[str, Any]]):
        self.counts: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
        self.starts: dict[tuple, dict[int, str | None]] = defaultdict(dict)  # the run each one started from
        self.start_bases: dict[tuple, dict[int, str | None]] = defaultdict(dict)  # ... or the run that one reruns
        self.by_start: dict[tuple, dict[int, dict[str | None, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
        self.ids: dict[tuple, tuple] = {}
        self._diffs: dict[tuple, Estimate | None] = {}
        self.relabel_quality: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in runs:
            k, seed = (r["dataset"], r["eval"], r["target"], r["arm"], r["n_labels"], r["steps_factor"]), r["seed"]
            self.by_start[k][seed][r.get("start")] = r["counts"]
            if seed not in self.counts[k] or not r.get("from_rerun"):
                self.counts[k][seed] = r["counts"]
                self.starts[k][seed] = r.get("start")
                self.start_bases[k][seed] = r.get("start_base", r.get("start"))
            self.ids[(r["dataset"], r["eval"])] = tuple(r["ids"])
            if "relabel_quality" in r:  # a relabel recipe's labels and the pseudo-masks on the pool's labeled records
                self.relabel_quality[(r["dataset"], r["target"], r["arm"])][seed] = r["relabel_quality"]

    def arm(self, key: tuple, reps: int) -> Estimate | None:
        by_seed = self.counts.get(key)
        return estimate(np.stack([by_seed[s] for s in sorted(by_seed)]), reps=reps) if by_seed else None

    def diff(self, a: tuple, b: tuple, reps: int) -> Estimate | None:
        """The paired difference a − b (seeded bootstrap: the same every call, so the tables and plots share it)."""
        if (a, b, reps) not in self._diffs:
            self._diffs[(a, b, reps)] = self._diff(a, b, reps)
        return self._diffs[(a, b, reps)]

    def _diff(self, a: tuple, b: tuple, reps: int) -> Estimate | None:
        pairs = [p for s in sorted(set(self.counts.get(a, {})) & set(self.counts.get(b, {})))
                 if (p := self.pair(a, b, s)) is not None]
        if not pairs:
            return None
        return paired_difference(np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs]), reps=reps)

    def pair(self, a: tuple, b: tuple, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The seed's runs of ``a`` and ``b``. Where both started from the same pretraining but one from an adopted
        rerun of it, the runs that share a start; None where there are none (a run from the rerun and one from the
        original: the pair would count the starts' difference as the arms'). Scratch pairs with either, and so do two
        arms that start from different pretrainings (SimCLR and end-to-end, or two pseudo-mask targets): their seed
        shares the labels, the init and the batch order, not a start."""
        x, y = self.starts[a][seed], self.starts[b][seed]
        if x is None or y is None or x == y or self.start_bases[a][seed] != self.start_bases[b][seed]:
            return self.counts[a][seed], self.counts[b][seed]
        ra, rb = self.by_start[a][seed], self.by_start[b][seed]
        common = [s for s in (x, y, *sorted(set(ra) - {None})) if s in ra and s in rb]
        return (ra[common[0]], rb[common[0]]) if common else None

    def partners(self, a: tuple, b: tuple) -> dict[int, np.ndarray]:
        """seed -> the run of ``b`` that :meth:`pair` takes where it is not the one the tables show (a partner from an
        adopted rerun)."""
        out = {}
        for seed in sorted(set(self.counts.get(a, {})) & set(self.counts.get(b, {}))):
            p = self.pair(a, b, seed)
            if p is not None and p[1] is not self.counts[b][seed]:
                out[seed] = p[1]
        return out


def fmt(e: Estimate | None, signed: bool = False) -> str:
    if e is None:
        return "—"
    sd = "" if np.isnan(e.sd) else f" ± {e.sd:.3f}"
    return f"{e.mean:+.3f}{sd}" if signed else f"{e.mean:.3f}{sd} ({e.n_seeds})"


def fmt_diff(e: Estimate | None) -> str:
    if e is None:
        return "—"
    text = f"{e.mean:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}]" + ("" if e.n_seeds >= MIN_SEEDS_BOLD else f" ({e.n_seeds})")
    return f"**{text}**" if e.excludes_zero and e.n_seeds >= MIN_SEEDS_BOLD else text


def table_arms(study: Study, d: StudyData) -> list[tuple[str, str]]:
    """The (arm, target) columns of a dataset's tables: scratch, the study's arms on the main target, then the other
    targets' arms."""
    main = d.main_target
    return ([("scratch", main)] + [(a, main) for a in study.arms if a != "scratch"]
            + [(a, t) for t in list(d.stores)[1:] for a in study.other_targets.arms]
            + [("end_to_end_kept", t) for t in d.stores])


def dataset_section(study: Study, d: StudyData, idx: Index, budgets: dict[int, list[str]], where: str) -> list[str]:
    """The arm table and the paired differences of one dataset on one evaluation (test split or a site)."""
    main, reps = d.main_target, study.bootstrap
    key = lambda arm, t, n, f=1: (d.name, where, t, arm, n, f)  # noqa: E731
    kept = kept_targets(d, idx)
    arms = [(a, t) for a, t in table_arms(study, d) if a != "end_to_end_kept" or t in kept]
    lines = ["| labels | " + " | ".join(arm_label(a, t, main) for a, t in arms) + " |",
             "|---:|" + "---:|" * len(arms)]
    no_labels = [(arm, t) for t in d.stores for arm in (("floor", "zero_shot") if t not in d.pool_extra else ("zero_shot",))]
    for arm, t in no_labels + [("weights_zero_shot", main)]:  # pooled: same masks, same floor
        e = idx.arm(key(arm, t, 0), reps)
        if e is not None:
            lines.append(f"| {arm_label(arm, t, main)} (no labels) | {fmt(e)} |" + " |" * (len(arms) - 1))
    for n, names in sorted(budgets.items()):
        cells = [fmt(idx.arm(key(a, t, n), reps)) for a, t in arms]
        lines.append(f"| {n} ({', '.join(names)}) | " + " | ".join(cells) + " |")
    pairs = [(("end_to_end", main), ("scratch", main)), (("encoder_only", main), ("scratch", main)),
             (("ssl", main), ("scratch", main)), (("end_to_end", main), ("ssl", main)),
             (("end_to_end", main), ("encoder_only", main))]
    pairs += [(("end_to_end", main), ("end_to_end", t)) for t in list(d.stores)[1:]]
    pairs += [(("end_to_end", t), ("scratch", main)) for t in list(d.stores)[1:]]  # each target against scratch too
    pairs += [(("end_to_end", t), ("ssl", main)) for t in list(d.stores)[1:]]  # and against the SSL encoder (the paper's claim)
    pairs += [(("end_to_end_kept", t), b) for t in kept for b in (("scratch", main), ("end_to_end", t))]
    if study.init_weights:  # init weights vs scratch, what pseudo-mask pretraining adds to them, and vs it from scratch
        extra = [(("weights", main), ("scratch", main)), (("weights_end_to_end", main), ("weights", main)),
                 (("weights_end_to_end", main), ("end_to_end", main)), (("end_to_end", main), ("weights", main))]
        pairs += extra
    # a column needs runs of both arms (a study without SimCLR or encoder-only shows no empty columns for them)
    pairs = [p for p in pairs if all(any(idx.counts.get(key(*arm, n)) for n in budgets) for arm in p)]
    if pairs:
        lines += ["", "Paired differences (seed-mean micro IoU, 95% bootstrap interval over test images and seeds; "
                  f"**bold**: the interval excludes 0 with >= {MIN_SEEDS_BOLD} seeds; (k): only k seeds, so the interval "
                  "covers test-image sampling but not training randomness, and is never bold):", "",
                  "| labels | " + " | ".join(f"{arm_label(*a, main)} − {arm_label(*b, main)}" for a, b in pairs) + " |",
                  "|---:|" + "---:|" * len(pairs)]
        for n, names in sorted(budgets.items()):
            cells = [fmt_diff(idx.diff(key(*a, n), key(*b, n), reps)) for a, b in pairs]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def join_blocks(blocks: list[list[str]]) -> list[str]:
    """Markdown blocks one after another, a blank line between two."""
    return [line for i, block in enumerate(blocks) for line in ([""] if i else []) + block]


def strategies_section(study: Study, d: StudyData, idx: Index, where: str) -> list[str]:
    """Which images to label: each strategy's end-to-end model against the arm's random subset (paired by seed)."""
    st = study.strategies
    if not st or (st.datasets and d.name not in st.datasets):
        return []
    ns = sorted({budget_count(b, d.n_labeled_train) for b in st.budgets})
    cols = [("end_to_end", "random (the arm's subset)")] + [(f"strategy:{s}", s) for s in st.names]
    kept_cols = [("end_to_end_kept", "random")] + [(f"strategy_kept:{s}", s) for s in st.names]
    blocks = []
    for target in strategy_targets(st, d):
        key = lambda arm, n, t=target: (d.name, where, t, arm, n, 1)  # noqa: E731
        lines = [] if target == d.main_target else [f"{arm_label('end_to_end', target, d.main_target)}:", ""]
        lines += ["| labels | " + " | ".join(name for _, name in cols) + " | "
                  + " | ".join(f"{s} − random" for s in st.names) + " |", "|---:|" + "---:|" * (len(cols) + len(st.names))]
        notes, kept = [], []
        for n in ns:
            cells = [fmt(idx.arm(key(a, n), study.bootstrap)) for a, _ in cols]
            cells += [fmt_diff(idx.diff(key(f"strategy:{s}", n), key("end_to_end", n), study.bootstrap)) for s in st.names]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
            cells = [fmt(idx.arm(key(a, n), study.bootstrap)) for a, _ in kept_cols]
            cells += [fmt_diff(idx.diff(key(f"strategy_kept:{s}", n), key("end_to_end_kept", n), study.bootstrap))
                      for s in st.names]
            if any(c != "—" for c in cells[1:]):
                kept.append(f"| {n} | " + " | ".join(cells) + " |")
            partners = {seed: c for s in st.names
                        for seed, c in idx.partners(key(f"strategy:{s}", n), key("end_to_end", n)).items()}
            shown = idx.counts.get(key("end_to_end", n), {})
            notes += [f"{n} labels, seed {seed}: {micro_iou(c):.3f} (the original start's {micro_iou(shown[seed]):.3f})"
                      for seed, c in sorted(partners.items())]
        if notes:
            lines += ["", "Random picks run again from an adopted rerun, the start of the strategy runs they pair with "
                      "(the random column shows the original start's): " + "; ".join(notes) + "."]
        if kept:
            lines += ["", "The same with `finetune.keep_start` (the default recipe: the pretrained model is kept where "
                      "fine-tuning on the picks does not beat it on val):", "",
                      "| labels | " + " | ".join(name for _, name in kept_cols) + " | "
                      + " | ".join(f"{s} − random" for s in st.names) + " |",
                      "|---:|" + "---:|" * (len(kept_cols) + len(st.names)), *kept]
        blocks.append(lines)
    return join_blocks(blocks)


def recipes_section(study: Study, d: StudyData, idx: Index, where: str) -> list[str]:
    """Each recipe against its arm as the grid runs it and against scratch (paired by seed: same start, same labels);
    a recipe that also runs on scratch (e.g. stronger augmentation) is paired with scratch under the recipe too."""
    blocks: list[list[str]] = []
    main, reps = d.main_target, study.bootstrap
    key = lambda arm, t, n: (d.name, where, t, arm, n, 1)  # noqa: E731
    for r in study.recipes:
        if r.datasets and d.name not in r.datasets:
            continue
        checked = study.convergence.budgets if study.convergence and r.name in study.convergence.recipes else []
        ns = sorted({budget_count(b, d.n_labeled_train) for b in r.budgets + checked})
        for arm in r.arms:
            for t in r.arm_targets(arm, main):
                var = recipe_arm(arm, r.name)
                if not any(idx.counts.get(key(var, t, n)) for n in ns):
                    continue
                cols = [(arm, t if arm in PSEUDO_ARMS else main), (var, t)] + ([("scratch", main)] if arm != "scratch" else [])
                if r.teacher:  # the run against its own teacher (the plain fine-tune it was taught by, same start and labels)
                    cols.insert(2, (teacher_arm(arm, r.name), t))
                if arm != "scratch" and "scratch" in r.arms:  # pretraining's effect under the recipe itself
                    cols.append((recipe_arm("scratch", r.name), t if r.fits_pseudo_masks else main))
                if arm == "scratch" and r.fits_pseudo_masks:  # one joint run from scratch against pretrain-then-fine-tune
                    cols += [c for c in (("end_to_end", t), ("end_to_end_kept", t))
                             if any(idx.counts.get(key(*c, n)) for n in ns)]
                pairs = [((var, t), c) for c in cols if c != (var, t)]
                teacher = (", the pool's targets its teacher's predictions (the arm's plain fine-tune, trained again in "
                           "the run)") if r.teacher else ""
                what = f"finetune {r.finetune}" if r.finetune else "the fine-tune as the arm's"
                note = relabel_note(r.name, d, t, idx, where, reps) if r.relabel else ""
                block = [f"`{r.name}`: {what}{teacher}{note}", "",
                         "| labels | " + " | ".join(arm_label(*c, main) for c in cols) + " | "
                         + " | ".join(f"{arm_label(*a, main)} − {arm_label(*b, main)}" for a, b in pairs) + " |",
                         "|---:|" + "---:|" * (len(cols) + len(pairs))]
                for n in ns:
                    cells = [fmt(idx.arm(key(*c, n), reps)) for c in cols]
                    cells += [fmt_diff(idx.diff(key(*a, n), key(*b, n), reps)) for a, b in pairs]
                    block.append(f"| {n} | " + " | ".join(cells) + " |")
                blocks.append(block)
                if arm == "end_to_end":
                    blocks += kept_recipe_block(r.name, t, ns, idx, key, main, reps)
    return join_blocks(blocks)


def relabel_note(recipe: str, d: StudyData, t: str, idx: Index, where: str, reps: int) -> str:
    """What a relabel recipe's start was: its labels against the pseudo-masks on the pool's labeled records, and the
    model pretrained on them scored without labels beside the first pretraining (seed means)."""
    quality = idx.relabel_quality.get((d.name, t, f"zero_shot+{recipe}"), {})
    if not quality:
        return ""
    mean = lambda part, k: float(np.mean([q[part][k] for q in quality.values()]))  # noqa: E731
    relabelled = idx.arm((d.name, where, t, f"zero_shot+{recipe}", 0, 1), reps)  # None where the start has no score
    return (f"; the pool re-labelled by the pretrained model, and a fresh model pretrained on those labels: the labels "
            f"score IoU {mean('labels', 'iou'):.3f} on the pool's {int(mean('labels', 'n'))} labeled records (the "
            f"pseudo-masks {mean('pseudo_masks', 'iou'):.3f}; {len(quality)} seed(s))"
            + (f"; without labels the re-labelled pretraining scores {fmt(relabelled)} here (the first pretraining "
               f"{fmt(idx.arm((d.name, where, t, 'zero_shot', 0, 1), reps))})" if relabelled is not None else ""))


def kept_recipe_block(recipe: str, t: str, ns: list[int], idx: Index, key, main: str, reps: int) -> list[list[str]]:
    """The recipe against the plain fine-tune, both with ``finetune.keep_start`` (the shipped default): shown where
    keep_start kept the start in some seed of either, so that it differs from the table above."""
    plain, var = "end_to_end_kept", recipe_arm("end_to_end_kept", recipe)
    unkept = {plain: "end_to_end", var: recipe_arm("end_to_end", recipe)}
    differs = any(not np.array_equal(c, idx.counts.get(key(unkept[a], t, n), {}).get(s))
                  for a in (plain, var) for n in ns for s, c in idx.counts.get(key(a, t, n), {}).items())
    if not differs or not any(idx.counts.get(key(var, t, n)) for n in ns):
        return []
    cols = [(plain, t), (var, t)]
    block = [f"`{recipe}` with keep_start (the pretrained model is kept where fine-tuning does not beat it on val):", "",
             "| labels | " + " | ".join(arm_label(*c, main) for c in cols) + f" | {arm_label(var, t, main)} − "
             f"{arm_label(plain, t, main)} |", "|---:|---:|---:|---:|"]
    for n in ns:
        block.append(f"| {n} | {fmt(idx.arm(key(plain, t, n), reps))} | {fmt(idx.arm(key(var, t, n), reps))} | "
                     f"{fmt_diff(idx.diff(key(var, t, n), key(plain, t, n), reps))} |")
    return [block]


def error_section(study: Study, d: StudyData, idx: Index, budgets: dict[int, list[str]], where: str) -> list[str]:
    """Where the errors are: false positives and false negatives as fractions of the true foreground (pooled pixels,
    mean over seeds), per arm and budget. A model that misses diseased lung at another site shows as FN, one that
    learned the pseudo-masks' dark background or borders as FP."""
    main = d.main_target
    kept = kept_targets(d, idx)
    arms = [(a, t) for a, t in table_arms(study, d) if a != "end_to_end_kept" or t in kept]
    key = lambda arm, t, n: (d.name, where, t, arm, n, 1)  # noqa: E731
    arms = [(a, t) for a, t in arms if any(idx.counts.get(key(a, t, n)) for n in budgets)]
    if not arms:
        return []

    def cell(a: str, t: str, n: int) -> str:
        by_seed = idx.counts.get(key(a, t, n))
        if not by_seed:
            return "—"
        rates = []
        for counts in by_seed.values():
            tp, fp, fn = np.asarray(counts, dtype=np.float64).sum(0)[:3]
            rates.append((fp / max(tp + fn, 1), fn / max(tp + fn, 1)))
        fp, fn = np.mean(rates, axis=0)
        return f"{fp:.3f} / {fn:.3f}"

    lines = ["| labels | " + " | ".join(arm_label(a, t, main) for a, t in arms) + " |", "|---:|" + "---:|" * len(arms)]
    for n, names in sorted(budgets.items()):
        if any(idx.counts.get(key(a, t, n)) for a, t in arms):
            lines.append(f"| {n} ({', '.join(names)}) | " + " | ".join(cell(a, t, n) for a, t in arms) + " |")
    return lines


def kept_targets(d: StudyData, idx: Index) -> list[str]:
    """The targets whose keep_start arm kept the start somewhere on the test split (elsewhere it is the end-to-end arm,
    so it gets no columns of its own)."""
    out = []
    for t in d.stores:
        for k, by_seed in idx.counts.items():
            if k[:4] == (d.name, "test", t, "end_to_end_kept"):
                e2e = idx.counts.get((d.name, "test", t, "end_to_end", *k[4:]), {})
                if any(s in e2e and not np.array_equal(c, e2e[s]) for s, c in by_seed.items()):
                    out.append(t)
                    break
    return out


def kept_section(d: StudyData, runs: list[dict[str, Any]]) -> list[str]:
    """Per target and budget: in how many seeds ``finetune.keep_start`` would keep the pretrained (start) model."""
    tally: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for r in runs:
        base, _, recipe = r["arm"].partition("+")
        if r["dataset"] == d.name and base == "end_to_end_kept" and r["eval"] == "test":
            tally[(r["target"], recipe, r["n_labels"])].append(r["start_kept"])
    lines = []
    for t in d.stores:
        for recipe in sorted({rc for tt, rc, _ in tally if tt == t}):
            cells = [f"{n} labels {sum(v)} of {len(v)}" for (tt, rc, n), v in sorted(tally.items())
                     if tt == t and rc == recipe]
            label = arm_label(recipe_arm("end_to_end", recipe or None), t, d.main_target)
            lines.append(f"- {label}: " + ", ".join(cells) + " fine-tunes")
    return lines


def gap_closed(d: StudyData, idx: Index, budgets: dict[int, list[str]], reps: int, min_gap: float = 0.01,
               factor: int = 1, recipe: str | None = None) -> list[str]:
    """How much of the gap between scratch at n labels and scratch with every label end-to-end pretraining closes, for
    each pseudo-mask target with end-to-end runs; the all-labels model is scratch's run with ``factor`` x the
    fine-tune steps (the convergence check's, where the schedule had not converged there). Where scratch is within
    ``min_gap`` of the all-labels model (or above it) there is no gap to close, and a ratio of two noisy differences
    would read as thousands of per cent: the line says so instead. With ``recipe``: every model (both arms and the
    all-labels one) fine-tuned with that recipe."""
    full = max(budgets)
    scratch, e2e = recipe_arm("scratch", recipe), recipe_arm("end_to_end", recipe)
    key = (d.name, "test", d.main_target, scratch, full, factor)
    top = idx.arm(key, reps)
    if top is None:
        return []
    steps = f", {factor}x steps" if factor != 1 else ""
    ref = f"all {full} labels{steps} {top.mean:.3f} ({top.n_seeds} seed{'s' if top.n_seeds > 1 else ''})"
    lines = []
    for t in d.stores:
        label = arm_label(e2e, t, d.main_target)
        for n in sorted(budgets):
            if n == full:
                continue
            s = idx.arm((d.name, "test", d.main_target, scratch, n, 1), reps)
            e = idx.arm((d.name, "test", t, e2e, n, 1), reps)
            if s is None or e is None:
                continue
            head = f"- {n} labels: {arm_label(scratch, d.main_target, d.main_target)} {s.mean:.3f}, {label} {e.mean:.3f}, {ref}: "
            if top.mean - s.mean < min_gap:
                lines.append(head + f"no gap to close (scratch is within {min_gap} of the all-labels model)")
            else:
                lines.append(head + f"{label} closes {100 * (e.mean - s.mean) / (top.mean - s.mean):.0f}% of the gap")
    return lines


def convergence(study: Study, d: StudyData, idx: Index, budgets: dict[int, list[str]]) -> list[str]:
    conv = study.convergence
    if not conv:
        return []
    lines = [f"| arm | labels | {conv.factor}x steps − 1x (per seed) | mean | converged (< {conv.tolerance}) |",
             "|---|---:|---|---:|---|"]
    for arm in conv.arms + [recipe_arm(a, r) for r in conv.recipes for a in conv.arms]:
        for n in sorted(budgets):
            short = idx.counts.get((d.name, "test", d.main_target, arm, n, 1), {})
            long = idx.counts.get((d.name, "test", d.main_target, arm, n, conv.factor), {})
            seeds = sorted(set(short) & set(long))
            if not seeds:
                continue
            diffs = [micro_iou(long[s]) - micro_iou(short[s]) for s in seeds]
            ok = "yes" if abs(float(np.mean(diffs))) < conv.tolerance else "**no**"
            lines.append(f"| {arm_label(arm, d.main_target, d.main_target)} | {n} | {', '.join(f'{x:+.4f}' for x in diffs)} | {np.mean(diffs):+.4f} | {ok} |")
    return lines if len(lines) > 2 else []


def compute(d: StudyData, rows: dict[str, dict[str, Any]], jobs: list[Job]) -> list[str]:
    parts: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    relabelled: set[str] = set()
    for j in jobs:
        r = rows.get(j.key)
        if r is None or j.dataset != d.name:
            continue
        count[j.kind] += 1
        for part, sec in r["seconds"].items():
            parts[f"{j.kind}: {part}"] += sec
        for part, sec in (r.get("teacher") or {}).get("seconds", {}).items():  # trained inside a teacher recipe's run
            parts[f"{j.kind}: teacher {part}"] += sec
        start = r.get("relabel")
        if start and start["source_sha256"] not in relabelled:  # a relabel recipe's start: once, shared by its runs
            relabelled.add(start["source_sha256"])
            for part, sec in start["seconds"].items():
                parts[f"relabel start: {part}"] += sec
    for t, store in d.stores.items():
        if t not in d.pool_extra:  # a pooled target reuses the main store
            parts[f"prep ({t})"] += prep_seconds(store) or 0.0
    total = sum(parts.values())
    return ([f"Runs finished: {', '.join(f'{v} {k}' for k, v in sorted(count.items()))}; wall time "
             f"{total / 3600:.2f} h in all (runs in parallel overlap):", ""]
            + [f"- {k}: {v / 60:.1f} min" for k, v in sorted(parts.items())])


def pairing_problems(runs: list[dict[str, Any]]) -> list[str]:
    labeled: dict[tuple, set] = defaultdict(set)
    tests: dict[tuple, set] = defaultdict(set)
    for r in runs:
        tests[(r["dataset"], r["eval"])].add(tuple(r["ids"]))
        if r["n_labels"] and not r["arm"].startswith(("strategy:", "strategy_kept:")):  # suggest's picks differ
            labeled[(r["dataset"], r["seed"], r["n_labels"])].add(tuple(r["labeled_ids"]))
    return ([f"{k}: {len(v)} different test sets" for k, v in tests.items() if len(v) > 1]
            + [f"{k}: arms used {len(v)} different label subsets" for k, v in labeled.items() if len(v) > 1])


def write_report(study: Study, data: list[StudyData], jobs: list[Job], log=print, left_out: Sequence[str] = ()) -> None:
    """table.md, results.csv and the plots of ``data``; ``left_out``: datasets of the study whose stores are not built
    here (a run of some datasets on a new machine), named at the top so a reader does not take them for dropped."""
    out = Path(study.results_dir)
    rows = ledger.read_ledger(out)
    runs = runs_from_ledger(rows, jobs)
    write_csv(runs, out / "results.csv")
    idx = Index(runs)
    md = [f"# Study {study.name}: generated by `medsass-train study` from {ledger.LEDGER}; do not edit", ""]
    if left_out:
        note = (f"Left out of this report: {', '.join(left_out)} (stores not built on the machine that wrote it; its "
                f"runs stay in {ledger.LEDGER}). `medsass-train study STUDY --report-only` builds every store and "
                "reports every dataset.")
        md += [note, ""]
        log(note)
    if study.init_weights:
        md += [f"Init weights of the arms {', '.join(ARM_NAMES[a] for a in WEIGHT_ARMS)}: `{Path(study.init_weights).name}` "
               "(fine-tuned from them; pretrained end to end on the main target's pseudo-masks from them, then fine-tuned)", ""]
    for d in data:
        budgets = budget_counts(study.budgets, d.n_labeled_train)
        n_test = len(idx.ids.get((d.name, "test"), ()))
        md += [f"## {d.name}", "", f"Test split: {n_test} labeled images. Micro IoU, mean ± sd over seeds (number of seeds).", ""]
        md += dataset_section(study, d, idx, budgets, "test")
        tol = study.convergence.tolerance if study.convergence else 0.01
        gap = gap_closed(d, idx, budgets, study.bootstrap, tol)
        if gap:
            md += ["", "Gap to the all-labels model closed by end-to-end pretraining:", "", *gap]
        longer = gap_closed(d, idx, budgets, study.bootstrap, tol, study.convergence.factor) if study.convergence else []
        if longer:
            md += ["", f"The same against the all-labels model fine-tuned {study.convergence.factor}x as long (the "
                   "convergence check's run: the reference where the schedule had not converged with every label):",
                   "", *longer]
        for r in [r for r in study.recipes if study.convergence and r.name in study.convergence.recipes
                  and (not r.datasets or d.name in r.datasets)]:
            r_budgets = budget_counts(r.budgets, d.n_labeled_train)
            # the recipe's all-labels run is the reference: without one (its budgets stop short of 100%), no lines
            lines = (gap_closed(d, idx, r_budgets, study.bootstrap, tol, recipe=r.name)
                     if max(r_budgets) == max(budgets) else [])
            if lines:
                md += ["", f"The same with every model fine-tuned with `{r.name}` (finetune {r.finetune}; its schedule "
                       "is checked in the convergence check below):", "", *lines]
        for site in d.sites:
            n_site = len(idx.ids.get((d.name, f"site:{site}"), ()))
            pooled = ", ".join(t for t in d.pool_extra)
            md += ["", f"### Cross-site: {d.name} models on {site} ({n_site} labeled images, never trained on with labels"
                   + (f"; the {pooled} models pretrained on the pseudo-masks of its train + val records" if pooled else "")
                   + ")", ""]
            md += dataset_section(study, d, idx, budgets, f"site:{site}")
        for where in ["test", *(f"site:{site}" for site in d.sites)]:
            errors = error_section(study, d, idx, budgets, where)
            if errors:
                md += ["", f"### Errors on {'the test split' if where == 'test' else where[5:]}: false positives / false "
                       "negatives as fractions of the true foreground (mean over seeds)", "", *errors]
        kept = kept_section(d, runs)
        if kept:
            md += ["", "### keep_start: fine-tunes that kept the pretrained model (its val IoU was not beaten)", "", *kept]
        for where in ["test", *(f"site:{site}" for site in d.sites)]:
            strat = strategies_section(study, d, idx, where)
            if strat:
                md += ["", "### Which images to label (`medsass-train suggest` strategies, end-to-end arm, IoU on "
                       f"{'the test split' if where == 'test' else where[5:]})", "", *strat]
        for where in ["test", *(f"site:{site}" for site in d.sites)]:
            rec = recipes_section(study, d, idx, where)
            if rec:
                md += ["", f"### Fine-tune recipes on {'the test split' if where == 'test' else where[5:]} (micro IoU; "
                       "paired differences as above)", "", *rec]
        conv = convergence(study, d, idx, budgets)
        if conv:
            md += ["", "### Convergence check (scratch, test IoU)", "", *conv]
        md += ["", "### Compute", "", *compute(d, rows, jobs), ""]
        png = out / f"{d.name}.png"
        if plot_dataset(study, d, idx, budgets, png):
            md += [f"![{d.name}]({png.name})", ""]
        png = out / f"{d.name}_strategies.png"
        if plot_strategies(study, d, idx, png):
            md += [f"![{d.name}: which images to label, strategy − random picks]({png.name})", ""]
    problems = pairing_problems(runs)
    md += ["## Pairing check", "", *(f"- {p}" for p in problems)] if problems else \
          ["## Pairing check", "", "Every arm of a (dataset, seed, labels) used the same labeled images; every run of a "
           "dataset was scored on the same test images."]
    adopted = [j for j in jobs if j.realization and j.key in rows]
    if adopted:
        md += ["", "Adopted reruns: pretrainings whose checkpoint was gone, run again on another machine, and not "
               "reproduced; the runs done after them started from the rerun (`--adopt-reruns`), with the arm a strategy "
               "or recipe run is compared with run again from it where the ledger had it from the original. A paired "
               "difference between two arms that both started from a pretraining pairs the runs of a seed that "
               "started from the same one; the tables show the original start's. A rerun that reproduced an earlier "
               "realization in every compared figure (made on that one's CPU type) is its *twin*: their runs pair as "
               "runs from one start, and no partner is run again.", ""]
        twins = twin_realizations(rows)
        md += [f"- {j.label}: {rows[j.key].get('differs', '')}"
               + ("" if j.key not in twins else f"; the twin of {'the original' if twins[j.key] == 0 else f'rerun {twins[j.key]}'}")
               + f"; started from it: {sum(1 for k in jobs if k.needs == j.key and k.key in rows)} runs" for j in adopted]
    atomic_write_bytes(out / "table.md", ("\n".join(md) + "\n").encode())
    log(f"report: {out / 'table.md'} ({len(runs)} evaluations from {len(rows)} ledger lines)")
