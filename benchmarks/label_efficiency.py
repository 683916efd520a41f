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

Modules: ``label_efficiency_grid`` (the study file, its stores and runs), ``label_efficiency_runs`` (running them,
resumably) and ``label_efficiency_report`` (CSV, table, plot, compare); this file is the command line.

Outputs: ``<results_dir>/results.csv`` (one row per run), ``table.md`` (mean ± std over seeds, and the paired
per-seed difference of each arm against scratch), ``plot.png``. Runs and stores go to ``<out_dir>`` (git-ignored).
Re-running skips finished runs (``result.json`` beside each run; the trainer also skips finished stages).
Relative paths in a study file are relative to the study file's folder.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from label_efficiency_grid import Study, load_study, make_jobs, prepare_stores, run_config
from label_efficiency_report import compare, report
from label_efficiency_runs import cached_result, execute
from medsass.trainer.config import load_config

from medsass.errors import ConfigError, MedsassError


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
